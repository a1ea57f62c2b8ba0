"""Progress bars for work that can take a while (training steps, validation, resharding, a checkpoint's seal,
export, eval): on a terminal only, and only once the work has taken a few seconds, so quick runs and logs
stay clean; `--no-progress` (logging.progress: false for training) turns them off.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, Optional

from tqdm import tqdm

DELAY_S = 2.0  # a bar appears only after this long; MEGAPILE_PROGRESS_DELAY overrides it (tests show them at once)


def bar(iterable: Optional[Iterable] = None, *, desc: str, total: Optional[int] = None, enabled: bool = True,
        unit: str = "it", leave: bool = False, initial: int = 0) -> tqdm:
    """A tqdm on stderr: off when not enabled or when stderr is not a terminal (tqdm's disable=None)."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, initial=initial, dynamic_ncols=True,
                file=sys.stderr, disable=None if enabled else True,
                delay=float(os.environ.get("MEGAPILE_PROGRESS_DELAY", DELAY_S)))
