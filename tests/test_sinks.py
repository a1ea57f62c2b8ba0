"""MetricsLogger and its sinks, in one process, without training: the logger forwards every call to every sink in
order (a spy sink records them); each sink's own output is compared with the lines it must write.
Across real restarts (wandb, TensorBoard, metrics.jsonl) see tests/test_metrics_sinks.py."""
import json
import os

import pytest

from megapile.config import LoggingConfig
from megapile.reporting.metrics import MetricsLogger
from megapile.reporting.sinks import ConsoleSink, MetricsFileSink, Sink, TensorBoardSink, hms


class Spy(Sink):
    """A sink that writes down what it is given, in a list it may share with other spies."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def log(self, step, metrics):
        self.calls.append((self.name, "log", step, metrics))

    def rewind(self, step):
        self.calls.append((self.name, "rewind", step))

    def message(self, text):
        self.calls.append((self.name, "message", text))

    def close(self):
        self.calls.append((self.name, "close"))


def test_the_logger_forwards_each_call_to_every_sink_in_order():
    calls = []
    logger = MetricsLogger([Spy("a", calls), Spy("b", calls)])
    logger.rewind(4)
    logger.log({"step": 5, "loss": 2.5, "grad_norm": None})
    logger.message("saved")
    logger.log({"step": 6, "loss": 2.4})
    logger.close()
    assert calls == [
        ("a", "rewind", 4), ("b", "rewind", 4),
        ("a", "log", 5, {"loss": 2.5, "grad_norm": None}), ("b", "log", 5, {"loss": 2.5, "grad_norm": None}),
        ("a", "message", "saved"), ("b", "message", "saved"),
        ("a", "log", 6, {"loss": 2.4}), ("b", "log", 6, {"loss": 2.4}),
        ("a", "close"), ("b", "close"),
    ]


def test_a_sink_needs_only_log():
    class Last(Sink):
        def log(self, step, metrics):
            self.seen = step

    sink = Last()
    logger = MetricsLogger([sink])
    logger.rewind(0)
    logger.message("hello")
    logger.log({"step": 1})
    logger.close()
    assert sink.seen == 1


def test_only_rank_0_writes(tmp_path, capsys):
    cfg = LoggingConfig(run_dir=str(tmp_path / "run"), wandb=False, tensorboard=True)
    other = MetricsLogger.for_rank(cfg, {}, is_main=False)
    other.rewind(0)
    other.log({"step": 1, "loss": 2.0})
    other.message("resumed")
    other.close()
    assert not os.path.exists(cfg.run_dir) and capsys.readouterr().out == ""
    main = MetricsLogger.for_rank(cfg, {}, is_main=True)
    assert [type(s) for s in main.sinks] == [MetricsFileSink, ConsoleSink, TensorBoardSink]
    main.close()


def test_metrics_file_rewind_drops_what_comes_after_the_step_and_a_cut_line(tmp_path):
    first = MetricsFileSink(str(tmp_path))
    first.rewind(0)
    for step in (1, 2, 3):
        first.log(step, {"loss": 4.0 - step, "grad_norm": None})
    first.close()
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')  # killed mid-write
    again = MetricsFileSink(str(tmp_path))  # the restart resumes the step-2 checkpoint
    again.rewind(2)
    again.log(3, {"loss": 0.5, "grad_norm": 1.0})
    again.close()
    assert path.read_text().splitlines() == [
        json.dumps({"step": 1, "loss": 3.0, "grad_norm": None}),
        json.dumps({"step": 2, "loss": 2.0, "grad_norm": None}),
        json.dumps({"step": 3, "loss": 0.5, "grad_norm": 1.0}),
    ]


def test_console_line_and_messages(capsys):
    sink = ConsoleSink()
    sink.log(30, {"loss": 2.345678, "val_loss": 2.5, "lr": 3e-4, "grad_norm": None, "tokens_per_s": 12345.6,
                  "tflops_per_device": 1.234, "mfu": 0.1234, "samples_seen": 240, "elapsed_seconds": 3725.4,
                  "eta_seconds": 65})
    sink.message("saved checkpoint")
    assert capsys.readouterr().out == ("step 30 | loss 2.3457 | val 2.5000 | lr 3.000e-04 | 12,346 tok/s | "
                                       "1.23 TFLOP/s/dev | MFU 12.3% | 1h02m05s elapsed | ETA 1m05s\n"
                                       "saved checkpoint\n")
    assert [hms(s) for s in (6, 245, 3723)] == ["6s", "4m05s", "1h02m03s"]


def test_tensorboard_shows_each_step_once_across_a_restart(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = TensorBoardSink(str(tmp_path))
    run.rewind(0)
    for step in (1, 2, 3, 4):
        run.log(step, {"loss": float(step), "grad_norm": None})
    run.rewind(2)  # a rollback to the step-2 checkpoint, in the same process
    run.log(3, {"loss": 30.0})
    run.close()
    restarted = TensorBoardSink(str(tmp_path))  # a requeue that resumes the step-3 checkpoint
    restarted.rewind(3)
    restarted.log(4, {"loss": 40.0})
    restarted.close()
    events = EventAccumulator(os.path.join(str(tmp_path), "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert events.Tags()["scalars"] == ["loss"]  # None is left out
