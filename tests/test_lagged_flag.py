"""The stop flag's agreement: every rank sees a flag one rank raised at the same step, one step later, and the
host never waits for the step it has just queued (megapile/parallel/lagged_flag.py)."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megapile.parallel import lagged_flag
from megapile.parallel.lagged_flag import LaggedFlag


def test_one_rank_is_answered_at_once():
    flag = LaggedFlag(1, torch.device("cpu"))
    assert [flag.exchange(f) for f in (False, True, False)] == [False, True, False]
    assert flag.drain() is False


def _ranks(rank: int, world: int, init_file: str, raised_at: dict, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    flag = LaggedFlag(world, torch.device("cpu"))
    seen = [flag.exchange(step == raised_at.get(rank)) for step in range(6)]
    out[rank] = (seen, flag.drain())
    dist.destroy_process_group()


@pytest.mark.parametrize("raised_at,expected_drain", [({1: 2}, False), ({0: 5}, True)])
def test_a_flag_raised_on_one_rank_is_seen_by_every_rank_one_step_later(tmp_path, raised_at, expected_drain):
    out = mp.Manager().dict()
    mp.spawn(_ranks, args=(2, str(tmp_path / "init"), raised_at, out), nprocs=2)
    step = next(iter(raised_at.values()))
    expected = [i == step + 1 for i in range(6)]
    assert out[0] == out[1] == (expected, expected_drain)


def test_on_cuda_the_host_waits_only_for_the_previous_step(monkeypatch):
    """The order of the CUDA calls, faked: a step's all-reduce is waited on by the stream (not the host), copied
    to pinned memory and marked by an event; the host synchronizes on that event only after the next step has
    been posted, and never on the event of the step it has just queued."""
    calls = []

    class Work:
        def __init__(self, n):
            self.n = n

        def wait(self):
            calls.append(f"stream waits for all-reduce {self.n}")

    class Event:
        count = 0

        def __init__(self):
            Event.count += 1
            self.n = Event.count

        def record(self):
            calls.append(f"record event {self.n}")

        def synchronize(self):
            calls.append(f"host waits for event {self.n}")

    reduced = []

    def all_reduce(tensor, async_op=False):
        assert async_op, "the flag's all-reduce must not block"
        reduced.append(tensor)
        calls.append(f"all-reduce {len(reduced)}")
        return Work(len(reduced))

    monkeypatch.setattr(lagged_flag.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)  # the CPU build has no pinned memory
    flag = LaggedFlag(2, torch.device("cpu"))
    flag._cuda, flag._host = True, torch.empty(1)  # the CUDA path, on CPU tensors

    assert flag.exchange(True) is False
    assert calls == ["all-reduce 1", "stream waits for all-reduce 1", "record event 1"]
    calls.clear()
    assert flag.exchange(False) is True  # step 1's flag, read after step 2 was posted...
    assert calls == ["host waits for event 1", "all-reduce 2", "stream waits for all-reduce 2", "record event 2"]
    calls.clear()  # ...and the host never waited for event 2 until the next step or the drain
    assert flag.drain() is False and calls == ["host waits for event 2"]
    assert flag.drain() is False and calls == ["host waits for event 2"]  # nothing left in flight
