"""A node's namespaces: a holder process that owns them, the argv prefix that runs a command inside, and the
processes found inside (by their network namespace), which is how a node is killed or torn down.

The holder is `unshare --net --uts --mount sleep infinity`: unshare execs sleep in the new namespaces, so the
holder's pid is the one Popen returned. `ip netns exec` is not used: it remounts /sys, which hides
/sys/fs/cgroup, and slurmd 22.05 then refuses to start.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

HOLDER_ARGV = ["unshare", "--net", "--uts", "--mount", "--propagation", "private", "sleep", "infinity"]
HOLDER_CMDLINE = b"sleep\0infinity\0"  # what a holder's /proc/PID/cmdline reads after unshare exec'd
START_TIMEOUT_S = 10.0


def start_holder() -> int:
    """A new set of namespaces; its holder's pid once the namespaces exist."""
    proc = subprocess.Popen(HOLDER_ARGV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    own = net_inode(os.getpid())
    deadline = time.monotonic() + START_TIMEOUT_S
    while net_inode(proc.pid) in (own, None):  # unshare has not switched yet
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(HOLDER_ARGV)} exited {proc.returncode}: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"no new network namespace for {proc.pid} within {START_TIMEOUT_S:g} s")
        time.sleep(0.01)
    proc.stderr.close()
    return proc.pid


def enter(holder: int, cwd: str | None = None) -> list[str]:
    """The argv prefix that runs a command in the holder's namespaces. --wd: entering a mount namespace
    would otherwise leave the command in its root directory."""
    return ["nsenter", "-t", str(holder), "--net", "--uts", "--mount"] + ([f"--wd={cwd}"] if cwd else []) + ["--"]


def net_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def pids_in(holder: int) -> list[int]:
    """Every process in the holder's network namespace but the holder: what ran or was ssh'd into the node."""
    inode = net_inode(holder)
    if inode is None:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != holder and net_inode(int(entry)) == inode:
            found.append(int(entry))
    return found


def kill_all_in(holder: int, timeout: float = 10.0) -> None:
    """SIGKILL every process in the namespace until none is left (a dying parent may still fork)."""
    deadline = time.monotonic() + timeout
    while pids := [p for p in pids_in(holder) if not _zombie(p)]:
        for pid in pids:
            _kill(pid)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in the namespace of {holder} survive SIGKILL")
        time.sleep(0.01)


def stop_holder(holder: int) -> None:
    """Kill what is inside, then the holder; the namespaces go with their last process."""
    if not is_holder(holder):
        return
    kill_all_in(holder)
    _kill(holder)
    try:  # our child when started by this process: reap it; a previous run's: init does
        os.waitpid(holder, 0)
    except ChildProcessError:
        pass


def is_holder(pid: int) -> bool:
    """Still a holder (not a reused pid): runs `sleep infinity` in a network namespace other than ours."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if f.read() != HOLDER_CMDLINE:
                return False
    except OSError:
        return False
    return net_inode(pid) not in (None, net_inode(os.getpid()))


def alive(pid: int) -> bool:
    """Running: neither gone nor a zombie (which stays until its parent, or a container's init, reaps it)."""
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True  # gone


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
