"""megapile/data/loader.py: each rank's rows of a global batch, keyed on the global sample index, read one batch
ahead in a background thread that never changes what is trained."""
import threading

import numpy as np
import pytest
import torch

from megapile.data.loader import Batches

CPU = torch.device("cpu")


class _Stream:
    """Row i holds global sample index i in every column; records every read, and fails if two threads read
    at once (the sample stream's epoch cache is not thread-safe)."""

    def __init__(self, width=5, fail_at=None):
        self.width, self.fail_at = width, fail_at
        self.reads = []
        self.busy = threading.Lock()
        self.overlapped = False

    def get_batch(self, start, count):
        if not self.busy.acquire(blocking=False):
            self.overlapped = True
            self.busy.acquire()
        try:
            if self.fail_at is not None and start <= self.fail_at < start + count:
                raise OSError(f"cannot read sample {self.fail_at}")
            self.reads.append((threading.current_thread().name, start, count))
            return np.repeat(np.arange(start, start + count, dtype=np.int64)[:, None], self.width, axis=1)
        finally:
            self.busy.release()


def _trained(batches, first):
    return [int(v) for x, y in batches.micro_batches(first, CPU) for v in x[:, 0]]


@pytest.mark.parametrize("prefetch", [True, False])
def test_every_global_sample_is_trained_once_across_ranks_and_a_batch_change(prefetch):
    """Two data-parallel ranks, global batch 8 for 4 steps, then 16 (batch ramp-up): the samples trained are
    exactly [0, 96), each once, whatever was read ahead."""
    streams = [_Stream(), _Stream()]
    trained, sample = [], 0
    for global_batch, steps in ((8, 4), (16, 4)):
        ranks = [Batches(streams[r], global_batch, 2, r, 2, prefetch=prefetch) for r in range(2)]
        for _ in range(steps):
            for batches in ranks:
                for x, y in batches.micro_batches(sample, CPU):
                    assert x.shape == (2, 4) and torch.equal(x, y)  # row i is all i: inputs == shifted targets
                    trained += x[:, 0].tolist()
            sample += global_batch
        for batches in ranks:
            batches.close()
    assert sorted(trained) == list(range(96))
    # micro-batch j of the batch at 0 on rank r: rows [j*m*dp + r*m, +m)
    assert _trained(Batches(_Stream(), 8, 2, 1, 2, prefetch=prefetch), 0) == [2, 3, 6, 7]


def test_the_next_batch_is_read_ahead_in_the_background_and_used():
    stream = _Stream()
    batches = Batches(stream, 8, 2, 0, 2)
    assert _trained(batches, 0) == [0, 1, 4, 5]
    batches._ahead[1].result()  # the read-ahead of the batch at sample 8 has run
    assert [start for _, start, _ in stream.reads] == [0, 4, 8, 12]
    assert all(name.startswith("megapile-batches") for name, start, _ in stream.reads if start >= 8)
    assert _trained(batches, 8) == [8, 9, 12, 13]  # served from the read-ahead, not read again
    assert [start for _, start, _ in stream.reads].count(8) == 1
    batches.close()


def test_a_request_for_another_sample_index_waits_for_the_read_ahead_then_reads_directly():
    """A resume, rollback or evaluation asks for another index: the read-ahead is dropped, never served."""
    stream = _Stream()
    batches = Batches(stream, 8, 2, 0, 2)
    _trained(batches, 0)
    assert _trained(batches, 40) == [40, 41, 44, 45]
    assert _trained(batches, 0) == [0, 1, 4, 5]  # back again (a rollback): the same rows as the first time
    batches.close()
    assert not stream.overlapped


def test_a_read_error_of_the_read_ahead_surfaces_at_the_step_that_needs_the_rows():
    stream = _Stream(fail_at=9)
    batches = Batches(stream, 8, 2, 0, 2)
    _trained(batches, 0)  # starts the read-ahead of samples [8, 16), which fails in the background
    with pytest.raises(OSError, match="cannot read sample 9"):
        _trained(batches, 8)
    batches.close()


def test_closing_stops_the_reader_and_later_requests_read_directly():
    stream = _Stream()
    batches = Batches(stream, 4, 2, 0, 1)
    _trained(batches, 0)
    batches.close()
    before = threading.active_count()
    assert _trained(batches, 4) == [4, 5, 6, 7]
    assert threading.active_count() == before


def test_each_micro_batch_goes_to_the_device_as_one_contiguous_block(monkeypatch):
    """A pinned block's column slices are not contiguous, and a non_blocking copy of them is staged through pageable
    memory; the loader copies the whole (m, seq_len + 1) block once and slices it on the device (faked here)."""
    from megapile.data import loader

    copies = []

    def fake_copy(block, device):
        assert block.is_contiguous() and block.shape == (2, 5)
        copies.append(block.clone())
        return copies[-1]

    monkeypatch.setattr(loader, "to_device", fake_copy)
    batches = Batches(_Stream(), 8, 2, 0, 2, prefetch=False)
    for x, y in batches.micro_batches(0, torch.device("cuda", 0)):
        block = copies[-1]  # the copy made for this micro-batch: inputs and targets are views of it
        assert x.data_ptr() == block.data_ptr() and y.data_ptr() == block.data_ptr() + block.element_size()
    assert len(copies) == 2
