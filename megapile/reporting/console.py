"""What reaches the console: megapile's own lines by default; the libraries' chatter with logging.verbose.

Filtered, by exact message, only what is known to be harmless: DeepSpeed's INFO lines (its logger stays at
WARNING), the deprecation FutureWarnings that DeepSpeed's ZeRO collectives raise inside torch on every save,
the line DeepSpeed prints when it loads its shm comm op, and wandb's run summary. Errors are never filtered.
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from typing import Iterator

# (category, regex matched at the start of the message): raised inside torch by DeepSpeed's calls
HARMLESS_WARNINGS = (
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
)


def configure(verbose: bool) -> None:
    """Set the libraries' verbosity for this process, once at start-up."""
    logging.getLogger("DeepSpeed").setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        for category, message in HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)


@contextlib.contextmanager
def library_output(verbose: bool) -> Iterator[None]:
    """Hold back what a library prints to stdout inside the block (DeepSpeed's "op built successfully"); it is
    shown after all when verbose, or when the block fails, so nothing that explains an error is lost."""
    if verbose:
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            yield
    except BaseException:
        sys.stdout.write(held.getvalue())
        raise
