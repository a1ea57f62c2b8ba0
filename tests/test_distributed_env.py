"""megapile.runtime.distributed.detect: every launcher's variables give the same DistEnv, and bad ones a one-line error."""
import os
import subprocess
import sys
import time

import pytest

from megapile.runtime import distributed
from megapile.runtime.distributed import DistEnv, LaunchError, detect, expand_nodelist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_nothing_set_is_a_world_of_one():
    env = detect({})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (0, 1, 0, "single")


def test_torchrun_and_deepspeed_variables():
    env = detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "1234"})
    assert env == DistEnv(3, 4, 1, "node0", 1234, "env")


def test_openmpi_variables_with_master():
    env = detect({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                  "MASTER_ADDR": "10.0.0.1"})
    assert env == DistEnv(1, 2, 1, "10.0.0.1", distributed.DEFAULT_PORT, "mpi")


def test_mpich_variables():
    env = detect({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MASTER_ADDR": "h", "MASTER_PORT": "7"})
    assert env == DistEnv(2, 4, 0, "h", 7, "mpi")


def test_mpirun_without_master_and_without_mpi4py(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # `import mpi4py` now raises ImportError
    with pytest.raises(LaunchError, match="MASTER_ADDR is not set under mpirun and mpi4py is not installed"):
        detect({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0"})


def test_srun_step_uses_first_host_and_job_id_port():
    env = detect({"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8",
                  "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[03-06]", "SLURM_JOB_NODELIST": "gpu[03-06]",
                  "SLURM_JOB_ID": "4242"})
    assert env == DistEnv(5, 8, 1, "gpu03", 20000 + 4242, "slurm")


def test_srun_master_variables_win():
    env = detect({"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0",
                  "SLURM_STEP_NODELIST": "a[1-2]", "SLURM_JOB_ID": "9", "MASTER_ADDR": "ib-a1", "MASTER_PORT": "555"})
    assert (env.master_addr, env.master_port, env.launcher) == ("ib-a1", 555, "slurm")


def test_batch_shell_is_not_a_step():
    """sbatch's shell has SLURM_PROCID=0 and SLURM_NTASKS=N but is not one of N ranks: a plain python there is alone."""
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"}).launcher \
        == "single"


def test_mpirun_wins_over_leaked_slurm_variables():
    env = detect({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_LOCALID": "0",
                  "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                  "MASTER_ADDR": "h"})
    assert (env.rank, env.world_size, env.launcher) == (1, 2, "mpi")


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "MASTER_ADDR is not set"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h"}, "RANK=2 is not within WORLD_SIZE=2"),
    ({"RANK": "-1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h"}, "RANK=-1 is not within"),
    ({"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE=0"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "LOCAL_RANK is not set"),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h"}, "RANK is not set"),
    ({"RANK": "one", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h"}, "RANK='one' is not an integer"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "MASTER_ADDR": "h"}, "LOCAL_RANK=3 is impossible"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "70000"},
     "MASTER_PORT=70000 is not a TCP port"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": ""}, "MASTER_ADDR is empty"),
    ({"OMPI_COMM_WORLD_RANK": "4", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
      "MASTER_ADDR": "h"}, "OMPI_COMM_WORLD_RANK=4 is not within OMPI_COMM_WORLD_SIZE=4"),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0"},
     "SLURM_PROCID=3 is not within SLURM_STEP_NUM_TASKS=2"),
])
def test_inconsistent_variables_name_the_problem(environ, message):
    with pytest.raises(LaunchError) as err:
        detect(environ)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("nodelist, hosts", [
    ("localhost", ["localhost"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("rack[1-2]-n[8-9]", ["rack1-n8", "rack1-n9", "rack2-n8", "rack2-n9"]),
    ("n[098-100]", ["n098", "n099", "n100"]),
])
def test_nodelist_expansion_matches_scontrol_syntax(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["gpu[01-", "gpu[a-b]", ""])
def test_bad_nodelist_is_a_launch_error(nodelist):
    with pytest.raises(LaunchError):
        expand_nodelist(nodelist)


@pytest.fixture
def restore_environ(monkeypatch):
    """distributed.init exports RANK/WORLD_SIZE/...: undo that after the test."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "unset-by-test")
        monkeypatch.delenv(key)


def test_unreachable_master_times_out_with_one_line(restore_environ):
    from harness import free_port

    start = time.monotonic()
    with pytest.raises(LaunchError) as err:
        distributed.init(DistEnv(1, 2, 1, "127.0.0.1", free_port(), "env"), "gloo", timeout_s=1.5)
    assert time.monotonic() - start < 10
    assert "did not answer within 1.5 s" in str(err.value) and "\n" not in str(err.value)


def test_unresolvable_master_is_named(restore_environ):
    with pytest.raises(LaunchError, match="MASTER_ADDR=no-such-host.invalid does not resolve"):
        distributed.init(DistEnv(1, 2, 1, "no-such-host.invalid", 29500, "env"), "gloo", timeout_s=1)


def test_hostfile_script_writes_deepspeed_and_mpich_formats():
    def hostfile(*args):
        proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "hostfile.sh"), *args], capture_output=True,
                              text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "SLURM_CONF"})
        return proc.returncode, proc.stdout, proc.stderr

    assert hostfile("gpu[01-02],cpu7", "4")[:2] == (0, "gpu01 slots=4\ngpu02 slots=4\ncpu7 slots=4\n")
    assert hostfile("--format", "mpich", "n[1-2]", "8")[:2] == (0, "n1:8\nn2:8\n")
    rc, _, err = hostfile("n[1-", "8")
    assert rc != 0 and "unbalanced" in err


_STALLED_PEER = """
import os, sys, time
import torch, torch.distributed as dist
from megapile.runtime import distributed
rank, port = int(os.environ["RANK"]), int(os.environ["MASTER_PORT"])
distributed.init(distributed.DistEnv(rank, 2, rank, "127.0.0.1", port, "env"), "gloo", timeout_s=3)
group = dist.new_group([0, 1])  # as DeepSpeed builds its groups: no timeout argument
if rank == 1:
    sys.stdin.read()  # alive, never joins the all-reduce: blocks until the test closes the pipe
start = time.monotonic()
try:
    dist.all_reduce(torch.ones(1), group=group)
except RuntimeError:
    print(f"failed after {time.monotonic() - start:.1f} s")
"""


@pytest.mark.slow
def test_groups_created_after_init_time_out_like_the_world_group(tmp_path):
    """DeepSpeed's own groups (ZeRO's gradient reduction runs on one) must not fall back to torch's 30-min default."""
    from harness import start_each_rank

    # stdin a pipe that stays open: rank 1 blocks on it until killed; the rendezvous comes from the environment
    peers = start_each_rank(2, ["-c", _STALLED_PEER], tmp_path / "logs", stdin=subprocess.PIPE)
    try:
        out = peers[0].finish(timeout=90, check=False).stdout
    finally:
        for p in peers:
            p.stop()
    assert "failed after" in out, peers[0].describe()
    assert float(out.split()[-2]) < 3 + 10


@pytest.mark.parametrize("launcher_env,visible,ordinal", [
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, 8, 1),  # torchrun
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3", "SLURM_JOB_ID": "7",
      "SLURM_STEP_NODELIST": "n1", "CUDA_VISIBLE_DEVICES": "3"}, 1, 0),  # srun --gpus-per-task=1: its own GPU
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
      "MASTER_ADDR": "h"}, 4, 2),  # mpirun, all of the node's GPUs visible
])
def test_each_rank_picks_a_gpu_it_can_see(monkeypatch, launcher_env, visible, ordinal):
    """The CUDA pieces are faked (availability, device count); the choice is real: one visible GPU is the task's
    own (ordinal 0, whatever LOCAL_RANK says), otherwise LOCAL_RANK, which must be visible."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    env = detect(launcher_env)
    assert distributed.local_device(env, launcher_env) == torch.device("cuda", ordinal)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.local_device(env, launcher_env) == torch.device("cpu")


def test_a_rank_without_a_gpu_of_its_own_is_a_launch_error():
    with pytest.raises(LaunchError, match=r"LOCAL_RANK=3 but this process sees 2 GPUs \(CUDA_VISIBLE_DEVICES=0,1\): "
                                          "give each task one GPU of its own, or every task all of the node's GPUs"):
        distributed.cuda_ordinal(3, 2, "0,1")


@pytest.mark.parametrize("error,failed", [
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 15000ms for recv "
                  "operation to complete"), True),  # gloo: a stopped rank
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:4242"),
     True),  # gloo: a dead rank
    ("DistBackendError", "[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5, OpType=ALLREDUCE, "
                         "NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran for 600027 milliseconds before timing out."),
    ("DistBackendError", "NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network "
                         "error, NCCL version 2.21.5 ncclRemoteError: A call failed possibly due to a network error"),
    (RuntimeError("NCCL communicator was aborted on rank 1."), True),  # a collective after the watchdog's abort
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),  # a real error: its traceback stays
    (ValueError("timeout"), False),
])
def test_a_collective_that_failed_because_a_rank_hung_or_died_is_recognised_on_both_backends(error, failed):
    import torch.distributed as dist

    if error == "DistBackendError":  # what NCCL raises (the watchdog's timeout, a dead peer)
        error, failed = dist.DistBackendError(failed), True
    assert distributed.collective_failed(error) is failed


def test_shutdown_after_a_failed_collective_sends_nothing_on_the_broken_group(monkeypatch):
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: calls.append("destroy"))
    distributed.shutdown(healthy=False)
    assert calls == []
    distributed.shutdown()
    assert calls == ["barrier", "destroy"]


def test_nccl_hands_its_failures_to_the_training_thread_unless_the_user_chose_otherwise():
    # CleanUpOnly: the watchdog aborts the communicators and the training thread raises DistBackendError (one line,
    # exit 1) instead of the default SkipCleanUp, which aborts the process with NCCL's own report
    assert distributed.nccl_error_handling({}) == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
                                                   "TORCH_NCCL_BLOCKING_WAIT": "0"}
    assert distributed.nccl_error_handling({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "NCCL_BLOCKING_WAIT": "1"}) == {}


def test_init_sets_the_nccl_error_handling_on_nccl_only(monkeypatch):
    import deepspeed
    from torch.distributed import distributed_c10d

    started = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: started.append(kw["dist_backend"]))
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):  # init sets them: put them back afterwards
        monkeypatch.setattr(distributed_c10d, name, getattr(distributed_c10d, name))
    for key in ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT",
                "NCCL_BLOCKING_WAIT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        # set, then deleted: monkeypatch restores only what it recorded, and init writes these into os.environ,
        # which later tests in this process (and the processes they start) would inherit
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    env = distributed.DistEnv(0, 1, 0, "127.0.0.1", 29500, "single")
    distributed.init(env, "gloo")
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in os.environ
    distributed.init(env, "nccl")
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2" and os.environ["TORCH_NCCL_BLOCKING_WAIT"] == "0"
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    distributed.init(env, "nccl")
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and started == ["gloo", "nccl", "nccl"]
