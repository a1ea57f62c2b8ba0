"""A real SLURM cluster for tests: its own munged, slurmctld and slurmd in a fresh temp dir.

    with SlurmCluster(cpus=2) as cluster:                  # one node, "localhost"
        job = cluster.sbatch(["slurm/train.sh", ...], cwd=ROOT)
        cluster.wait_for(job, {"COMPLETED"}, timeout=120)

    with SlurmCluster(cpus=1, nodes={"node1": ip1, "node2": ip2}, on_node=...) as cluster:   # several hosts

With several nodes (tests/cluster/'s simulated hosts), `on_node(name, cwd)` is the argv prefix that runs a
command on that host: slurmctld and the client commands (sbatch, scontrol ...) run on the first node, one
slurmd on each; munged stays here, its socket reachable from every host through the shared filesystem.

Every daemon runs in the foreground as a child of this process, writes a pid file, and is stopped by that
pid in `stop()` (after every job is cancelled), so nothing outlives the test session and a second cluster
in the same CI run starts clean: new directories, new munge key and socket, new ports.
Requeue is made fast (credentials expire in 10 s, the scheduler runs every 2 s): about 12 s from
`scontrol requeue` to the job running again. Needs SLURM and munge from Debian (`.ci/run` installs them).
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Callable

from harness import free_port, wait_for

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")
MISSING_HELP = ("SLURM/munge are not installed ({names} missing): .ci/run installs them "
                "(apt-get install slurmctld slurmd slurm-client munge)")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    def __init__(self, cpus: int = 2, start_timeout: float = 60.0, nodes: dict[str, str] | None = None,
                 on_node: Callable[[str, str | None], list[str]] | None = None) -> None:
        self.cpus = cpus  # per node
        self.nodes = nodes or {"localhost": "127.0.0.1"}  # name → address; the first one is the controller
        self.on_node = on_node or (lambda name, cwd: [])
        self.controller = next(iter(self.nodes))
        self.start_timeout = start_timeout
        self.root = tempfile.mkdtemp(prefix="megapile-slurm-")
        os.chmod(self.root, 0o755)  # munged runs as the munge user and must reach its own subfolder
        self.conf = os.path.join(self.root, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.procs: dict[str, subprocess.Popen] = {}
        self.pid_files: dict[str, str] = {}

    # -- life cycle --------------------------------------------------------------------------------------
    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        missing = missing_binaries()
        if missing:
            raise SlurmError(MISSING_HELP.format(names=", ".join(missing)))
        self._start_munge()
        self._write_conf()
        self._spawn("slurmctld", self.on_node(self.controller, None) + [_which("slurmctld"), "-D", "-f", self.conf])
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", self.on_node(node, None) + [_which("slurmd"), "-D", "-N", node, "-f", self.conf])
        state = [""]

        def idle() -> bool:
            self._check_alive()  # a daemon that died fails at once, with its output
            out = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            state[0] = out.stdout.strip()
            states = state[0].split()
            return out.returncode == 0 and len(states) == len(self.nodes) and set(states) <= {"idle", "mixed"}

        wait_for(idle, None, self.start_timeout, "idle SLURM nodes",
                 detail=lambda: f"state {state[0]!r}; logs in {self.root}:\n{self.logs()}", every=0.25)

    def stop(self) -> None:
        """Cancel every job, wait for them to end, then stop the slurmds, slurmctld, munged by their pid files."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--user", pwd.getpwuid(os.getuid()).pw_name], check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.5)
        for name in [f"slurmd-{node}" for node in self.nodes] + ["slurmctld", "munged"]:
            pid, proc = self._pid(name), self.procs.get(name)
            if proc is not None:
                proc.terminate()
            if pid is not None and (proc is None or pid != proc.pid):
                _terminate(pid)  # munged runs under runuser: the pid file names the daemon itself
            if proc is not None:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- using it -----------------------------------------------------------------------------------------
    def run(self, args: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """A client command, on the controller's node."""
        env = dict(self.env, **kw.pop("env", {}))
        prefix = self.on_node(self.controller, kw.get("cwd"))
        proc = subprocess.run(prefix + args, env=env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def sbatch(self, args: list[str], cwd: str, env: dict | None = None) -> str:
        """Submit; return the job id."""
        out = self.run(["sbatch", "--parsable"] + args, cwd=cwd, env=env or {})
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once the job is forgotten."""
        out = self.run(["scontrol", "show", "job", "-o", job_id], check=False)
        if out.returncode != 0:
            return {}
        return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)

    def wait_for(self, job_id: str, states: set[str], timeout: float, since_restart: int = 0) -> dict[str, str]:
        """Poll until the job is in one of `states` with Restarts >= since_restart; fail on a final state."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED"}
        info: dict[str, str] = {}

        def reached() -> bool:
            self._check_alive()
            info.clear()
            info.update(self.job(job_id))
            state = info.get("JobState", "")
            if state in final and state not in states:
                raise SlurmError(f"job {job_id} ended {state} (exit {info.get('ExitCode')}), waiting for {states}")
            return state in states and int(info.get("Restarts", 0)) >= since_restart

        wait_for(reached, None, timeout, f"job {job_id} in {states}", detail=lambda: f"{info}", every=0.5)
        return info

    def logs(self) -> str:
        parts = []
        for name in ["munged", "slurmctld"] + [f"slurmd-{node}" for node in self.nodes]:
            path = os.path.join(self.root, f"{name}.log")
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    parts.append(f"--- {name}.log (tail)\n" + "".join(f.readlines()[-30:]))
        return "\n".join(parts)

    # -- internals -----------------------------------------------------------------------------------------
    def _start_munge(self) -> None:
        munge_dir = os.path.join(self.root, "munge")
        os.makedirs(munge_dir)
        os.chmod(munge_dir, 0o755)  # clients (slurm, as root) need to reach the socket
        key = os.path.join(munge_dir, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(128))
        os.chmod(key, 0o400)
        user = pwd.getpwnam("munge")
        for path in (munge_dir, key):
            os.chown(path, user.pw_uid, user.pw_gid)
        self.munge_socket = os.path.join(munge_dir, "munge.socket")
        self.pid_files["munged"] = os.path.join(munge_dir, "munged.pid")
        cmd = [_which("munged"), "--foreground", f"--key-file={key}", f"--socket={self.munge_socket}",
               f"--pid-file={self.pid_files['munged']}", f"--seed-file={munge_dir}/munged.seed",
               f"--log-file={munge_dir}/munged.log"]
        self._spawn("munged", ["runuser", "-u", "munge", "--"] + cmd, log=False)

        def socket_made() -> bool:
            self._check_alive()
            return os.path.exists(self.munge_socket)

        wait_for(socket_made, None, 20, f"munge socket {self.munge_socket}", every=0.1)

    def _write_conf(self) -> None:
        for sub in ["state", "log"] + [os.path.join("spool", node) for node in self.nodes]:
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self.pid_files["slurmctld"] = os.path.join(self.root, "slurmctld.pid")
        for node in self.nodes:  # %n: each slurmd's own name (-N), so several share one folder
            self.pid_files[f"slurmd-{node}"] = os.path.join(self.root, f"slurmd-{node}.pid")
        user = pwd.getpwuid(os.getuid()).pw_name
        lines = [
            "ClusterName=megapile-test",
            f"SlurmctldHost={self.controller}({self.nodes[self.controller]})",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={self.root}/state",
            f"SlurmdSpoolDir={self.root}/spool/%n",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}",
            f"SlurmdPidFile={self.root}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.root}/slurmctld.log",
            f"SlurmdLogFile={self.root}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "EnforcePartLimits=ALL",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=10",
            "MinJobAge=300",
            "MailProg=/bin/true",
            "MpiDefault=none",
        ] + [f"NodeName={node} NodeAddr={addr} CPUs={self.cpus} State=UNKNOWN" for node, addr in self.nodes.items()] + [
            f"PartitionName=cpu Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd: list[str], log: bool = True) -> None:
        out = open(os.path.join(self.root, f"{name}.stdout"), "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        out.close()

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                with open(os.path.join(self.root, f"{name}.stdout"), errors="replace") as f:
                    output = f.read()[-2000:]
                raise SlurmError(f"{name} exited {proc.returncode}: {output}\n{self.logs()}")

    def _pid(self, name: str) -> int | None:
        try:
            with open(self.pid_files.get(name, "")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None


def _terminate(pid: int, grace: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
