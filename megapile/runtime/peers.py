"""Who every rank is (host, address, pid, device), shared once at start-up, so that an error about another rank
can say which one: `node2 (rank 1, pid 4242)` rather than "another rank".

The table is gathered over the process group right after it starts (one all_gather_object). A failed collective
is then explained from what this rank can see: the peer address gloo or NCCL put in the error text, and, for
ranks on this same host, whether their process still exists.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Iterable, Optional


class PeerLost(Exception):
    """A collective failed because another rank died, hung or lost its network; the message is the one line.
    `reporter`: the heartbeat's (megapile/runtime/heartbeat.py), which may already have said it."""

    def __init__(self, line: str, reporter=None) -> None:
        super().__init__(line)
        self.reporter = reporter


@dataclass(frozen=True)
class Peer:
    rank: int
    host: str  # socket.gethostname() of the rank's machine
    address: str  # the rank's own address on the route to the master: what other ranks see it as
    pid: int
    device: str  # "cpu", "cuda:3"


def me(rank: int, master_addr: str, master_port: int, device: str) -> Peer:
    return Peer(rank, socket.gethostname(), route_address(master_addr, master_port), os.getpid(), device)


def route_address(host: str, port: int) -> str:
    """This machine's address on the route to `host`: a UDP socket's connect only picks the route, sends nothing."""
    try:
        family, _, _, _, target = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(target)
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def gather(mine: Peer, world_size: int) -> "Peers":
    """Every rank's Peer, on every rank (a collective)."""
    if world_size == 1:
        return Peers([mine])
    import torch.distributed as dist  # lazy: torch, as in megapile/runtime/distributed.py

    table: list[Optional[Peer]] = [None] * world_size
    dist.all_gather_object(table, mine)
    return Peers([p for p in table if p is not None])


# gloo writes a peer as "[10.0.0.2]:41234" ("Connection closed by peer [10.0.0.2]:41234"); NCCL as "10.0.0.2<41234>"
_ADDRESS = re.compile(r"\[([0-9A-Fa-f.:]+)\]:\d+|(\d+\.\d+\.\d+\.\d+)<\d+>")


class Peers:
    """The rank table, and the words for naming ranks in an error."""

    def __init__(self, peers: list[Peer]) -> None:
        self.peers = sorted(peers, key=lambda p: p.rank)

    def __getitem__(self, rank: int) -> Peer:
        return self.peers[rank]

    def describe(self, ranks: Iterable[int]) -> str:
        """`node2 (rank 1, pid 4242)`, `node2 (ranks 2, 3; pids 40, 41) and node3 (rank 4, pid 50)`."""
        by_host: dict[str, list[Peer]] = {}
        for rank in sorted(set(ranks)):
            by_host.setdefault(self.peers[rank].host, []).append(self.peers[rank])
        parts = []
        for host, group in by_host.items():
            if len(group) == 1:
                parts.append(f"{host} (rank {group[0].rank}, pid {group[0].pid})")
            else:
                parts.append(f"{host} (ranks {', '.join(str(p.rank) for p in group)}; "
                             f"pids {', '.join(str(p.pid) for p in group)})")
        return " and ".join(parts)

    def suspects(self, error_text: str, me: int) -> list[int]:
        """The ranks a failed collective points at: those at an address the error names, less this rank and the
        ranks on this host whose process is still alive; plus the ranks on this host whose process is gone.
        Empty when nothing points anywhere."""
        mine = self.peers[me]
        named = {m.group(1) or m.group(2) for m in _ADDRESS.finditer(error_text)}
        local = [p for p in self.peers if p.host == mine.host and p.rank != me]
        dead_here = {p.rank for p in local if not _alive(p.pid)}
        pointed = {p.rank for p in self.peers if p.address in named and p.rank != me
                   and not (p.host == mine.host and p.rank not in dead_here)}
        return sorted(pointed | dead_here)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def failure_line(peers: Optional[Peers], me: int, error: BaseException, step: Optional[int],
                 collective_timeout_s: float) -> str:
    """The one line for a collective that failed because another rank died, hung or lost its network. `peers`:
    None before the table was gathered; `step`: None during start-up."""
    text = " ".join(str(error).split())
    suspects = peers.suspects(text, me) if peers is not None else []
    who = peers.describe(suspects) if suspects else "another rank"
    lower = text.lower()
    if "connection timed out" in lower:  # the socket's own timeout (ETIMEDOUT), not the collective's
        what = "stopped answering (the connection to it timed out: its host is down or unreachable from here)"
    elif "timed out" in lower or "timeout" in lower:
        what = f"did not answer within train.collective_timeout_s={collective_timeout_s:g} s"
    else:
        what = "dropped its connection (its process died or its host went down)"
    when = f"at step {step}" if step is not None else "during start-up"
    return (f"{who} {what} {when}; every rank stops; restart the job to resume from the last checkpoint "
            f"({text[:200]})")
