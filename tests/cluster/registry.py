"""Which simulated clusters exist on this machine, so that a run killed before its teardown (SIGKILL, a CI
timeout) leaves nothing behind for long: the next cluster's start removes the namespaces and links of every
record whose owner process is gone, and any link named like ours that no live record claims.

A record is RECORDS/<third byte>.json, created exclusively: it also reserves the subnet between two runs.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from cluster import namespaces, network

RECORDS = "/run/megapile-cluster"
ROOT_PREFIX = os.path.join(tempfile.gettempdir(), "megapile-cluster-")  # a cluster's files: removed with it


def reserve(owner_pid: int, root: str) -> int:
    """Claim a free 10.213.X.0/24 for this process, whose files are in `root`; returns X."""
    os.makedirs(RECORDS, exist_ok=True)
    for third in network.free_thirds():
        try:
            fd = os.open(_path(third), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"owner": owner_pid, "owner_start": _start_time(owner_pid), "root": root, "holders": []}, f)
        return third
    raise RuntimeError(f"no free 10.213.X.0/24 subnet (records in {RECORDS})")


def record_holders(third: int, holders: list[int]) -> None:
    """Written as each node starts, so a crash in the middle still leaves the holders findable."""
    with open(_path(third)) as f:
        record = json.load(f)
    record["holders"] = holders
    tmp = _path(third) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, _path(third))


def release(third: int) -> None:
    try:
        os.unlink(_path(third))
    except FileNotFoundError:
        pass


def reap_leftovers() -> list[str]:
    """Tear down every cluster whose owner is dead, and unclaimed links; returns what was removed."""
    removed = []
    live = set()
    for entry in os.listdir(RECORDS) if os.path.isdir(RECORDS) else []:
        if not entry.endswith(".json"):
            continue
        third = int(entry.removesuffix(".json"))
        try:
            with open(_path(third)) as f:
                record = json.load(f)
        except (OSError, ValueError):  # being written by its owner right now (or torn by a crash: left alone)
            live.add(third)
            continue
        if _alive(record["owner"], record.get("owner_start")):
            live.add(third)
            continue
        for holder in record["holders"]:
            namespaces.stop_holder(holder)
        if record.get("root", "").startswith(ROOT_PREFIX):
            shutil.rmtree(record["root"], ignore_errors=True)
        removed.append(f"cluster 10.213.{third}.0/24 of dead pid {record['owner']}")
        release(third)
    for link in network.links_named(network.PREFIX):
        third = link.removeprefix(network.PREFIX).split("br")[0].split("n")[0]
        # a record made since the listing above is a cluster starting now (records come before links)
        if not third.isdigit() or (int(third) not in live and not os.path.exists(_path(int(third)))):
            network.delete_link(link)
            removed.append(f"link {link}")
    return removed


def _path(third: int) -> str:
    return os.path.join(RECORDS, f"{third}.json")


def _alive(pid: int, start: str | None) -> bool:
    """Running and the same process (a reused pid has another start time)."""
    return pid > 0 and _start_time(pid) is not None and _start_time(pid) == start


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
