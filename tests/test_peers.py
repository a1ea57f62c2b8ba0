"""Naming a lost rank: the rank table's words, which ranks a failed collective points at, and the heartbeat that
finds a silent rank (or a store that went away) and tells every rank, all in one process over a real TCPStore."""
import datetime
import os
import subprocess
import sys

import pytest
import torch.distributed as dist
from harness import wait_for

from megapile.runtime.heartbeat import Heartbeat, Reporter
from megapile.runtime.peers import Peer, Peers, failure_line, route_address

GONE_PID = 2**22 + 12345  # above pid_max's default: no such process


def _table(*hosts_and_pids) -> Peers:
    addresses = {"node1": "10.9.0.1", "node2": "10.9.0.2", "node3": "10.9.0.3"}
    return Peers([Peer(rank, host, addresses[host], pid, "cpu") for rank, (host, pid) in enumerate(hosts_and_pids)])


def test_describe_groups_ranks_by_host():
    peers = _table(("node1", 10), ("node2", 20), ("node2", 21), ("node3", 30))
    assert peers.describe([1]) == "node2 (rank 1, pid 20)"
    assert peers.describe([3, 1, 2]) == "node2 (ranks 1, 2; pids 20, 21) and node3 (rank 3, pid 30)"


def test_gloo_peer_address_names_the_ranks_on_that_host():
    peers = _table(("node1", os.getpid()), ("node2", 20), ("node3", 30))
    text = "[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.9.0.2]:41234"
    assert peers.suspects(text, me=0) == [1]
    line = failure_line(peers, 0, RuntimeError(text), 37, 600)
    assert line.startswith("node2 (rank 1, pid 20) dropped its connection (its process died or its host went down) "
                           "at step 37; every rank stops")


def test_on_one_host_the_dead_process_is_named_not_the_live_ones():
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        peers = _table(("node1", os.getpid()), ("node1", alive.pid), ("node1", GONE_PID))
        assert peers.suspects("Connection reset by peer [10.9.0.1]:5000", me=0) == [2]
    finally:
        alive.kill()
        alive.wait()


def test_a_socket_timeout_is_not_called_the_collective_timeout():
    peers = _table(("node1", 10), ("node2", os.getpid()))
    text = "[gloo/transport/tcp/pair.cc:537] Read error [10.9.0.1]:14238: Connection timed out."
    assert failure_line(peers, 1, RuntimeError(text), 4, 600).startswith(
        "node1 (rank 0, pid 10) stopped answering (the connection to it timed out: its host is down or unreachable "
        "from here) at step 4")


def test_a_timeout_without_an_address_names_nobody():
    peers = _table(("node1", os.getpid()), ("node2", 20))
    line = failure_line(peers, 0, RuntimeError("Timed out waiting 15000ms for recv operation to complete"), 5, 15)
    assert line.startswith("another rank did not answer within train.collective_timeout_s=15 s at step 5")
    assert failure_line(None, 0, RuntimeError("Connection closed by peer"), None, 15).startswith(
        "another rank dropped its connection (its process died or its host went down) during start-up")


def test_route_address_is_the_address_toward_the_master():
    assert route_address("127.0.0.1", 29500) == "127.0.0.1"


# -- the heartbeat, three ranks in one process over a real store ------------------------------------------------
TIMEOUT = 1.0


@pytest.fixture
def store():
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=10))
    yield master


def _beats(store, ranks, world=3):
    """Heartbeats of `ranks` in a world of `world`; each records its line instead of leaving the process."""
    peers = _table(*[(f"node{r + 1}", 100 + r) for r in range(world)])
    lines: dict[int, str] = {}
    beats = {r: Heartbeat(peers, r, "127.0.0.1", store.port, TIMEOUT, Reporter(),
                          leave=lambda line, r=r: lines.__setitem__(r, line)).start() for r in ranks}
    return beats, lines


def test_a_silent_rank_is_named_by_every_rank(store):
    beats, lines = _beats(store, [0, 1])  # rank 2 never beats: its host is gone
    try:
        wait_for(lambda: len(lines) == 2, None, 30 * TIMEOUT, "both ranks naming the silent one", every=0.05)
    finally:
        for beat in beats.values():
            beat.stop()
    for line in lines.values():
        assert "node3 (rank 2, pid 102) stopped responding at step 0: no heartbeat for 1 s" in line, lines


def test_a_rank_that_finished_is_not_taken_for_dead(store):
    beats, lines = _beats(store, [0, 1], world=2)
    beats[1].stop()  # rank 1 is done (and stops beating); rank 0 still finishing its last step
    wait_for(lambda: beats[0]._thread is not None, None, 5, "rank 0 watching")
    # Rank 0 looks every TIMEOUT/4 s: three whole timeouts without a verdict
    stopped = beats[0]._stop.wait(3 * TIMEOUT)
    beats[0].stop()
    assert not stopped and lines == {}


def test_a_store_that_went_away_is_named():
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=10))
    beats, lines = _beats(master, [1], world=2)
    del master  # rank 0's host, which held the store, is gone
    wait_for(lambda: 1 in lines, None, 30 * TIMEOUT, "rank 1 naming the store's host", every=0.05)
    beats[1].stop()
    assert "the launcher's store at 127.0.0.1:" in lines[1] and "on node1 (rank 0, pid 100) stopped answering" in lines[1]
