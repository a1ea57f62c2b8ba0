"""megapile/train.py on a fake clock (a test harness): every training step takes exactly 1 s, every
evaluation 1000 s and every checkpoint save 500 s, whatever the machine does. The logged tokens/s must then be
exactly the tokens of a step per second: evaluation and saving are timed apart (eval_seconds, save_seconds)."""
import os
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from megapile import train  # noqa: E402
from megapile.checkpoint import manager  # noqa: E402
from megapile.runtime.process_exit import exit_now  # noqa: E402

_now = [0.0]
train.time = types.SimpleNamespace(**{**vars(time), "perf_counter": lambda: _now[0]})


def _takes(seconds: float, function):
    def timed(*args, **kwargs):
        out = function(*args, **kwargs)
        _now[0] += seconds
        return out
    return timed


train.train_step = _takes(1.0, train.train_step)
train.evaluate = _takes(1000.0, train.evaluate)
manager.save = _takes(500.0, manager.save)
exit_now(train.main())
