"""Launchers across two simulated hosts (tests/cluster/): node1 and node2 have their own network, hostname and
sshd, and share the filesystem, so each launcher is used as on a real cluster: torchrun once per node (static
and c10d rendezvous), `deepspeed --hostfile` reaching node2 over ssh (pdsh) from node1, `mpirun -H` over ssh
with mpi4py choosing the master, and `sbatch --nodes 2 slurm/train.sh` on a SLURM cluster of the two hosts.
Every run must give the per-step losses of one process; a run stopped after HALF steps and resumed to STEPS
gives the losses of the uninterrupted cross-host run, bit for bit.
"""
import os
import sys

import pytest
from harness import ROOT, free_port, process_env
from slurm_cluster import SlurmCluster, missing_binaries
from train_helpers import TRAIN, assert_close, launch, losses, read_metrics, small_run_overrides

from megapile.checkpoint import list_complete

STEPS = 8
HALF = 4
DS = os.path.join(ROOT, "ds_configs")
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
RUN_S = 300  # a bound for a hang, not a guess of the speed


def _env(**extra) -> dict:
    """No variable of an enclosing launcher (the suite may run under SLURM or mpirun); OpenMPI allowed as root."""
    env = {k: None for k in os.environ if k in LAUNCHER_VARS or k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **extra)
    return env


def _overrides(preprocessed, tokenizer_path, run_dir, steps=STEPS) -> list[str]:
    """The decay is fixed at STEPS, so a run of HALF steps is the first half of one of STEPS."""
    return small_run_overrides(preprocessed, tokenizer_path, run_dir, train__max_steps=steps,
                               optim__decay_steps=STEPS)


def _train(ds_config: str, overrides: list[str]) -> list[str]:
    return [TRAIN, "--deepspeed_config", os.path.join(DS, ds_config), *overrides]


def _torchrun_on_both(cluster, rendezvous, target, logs) -> dict:
    """torchrun on node2 and node1, one rank each; both must succeed. Returns node name → completed process."""
    started = {}
    try:
        for node in reversed(cluster.nodes):
            argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                    *rendezvous(node), *target]
            started[node.name] = cluster.start(node, argv, logs, env=_env(), name=f"{node.name}-torchrun")
        return {name: proc.finish(RUN_S) for name, proc in started.items()}
    finally:
        for proc in started.values():
            proc.stop()


def _static(port):
    return lambda node: ["--node_rank", str(node.index - 1), "--master_addr", "node1", "--master_port", str(port)]


def _c10d(port):
    return lambda node: ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"node1:{port}", "--rdzv_id", "megapile"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, preprocessed, tokenizer_path):
    """STEPS steps in one plain process: the losses every cross-host run must reproduce."""
    run_dir = str(tmp_path_factory.mktemp("ref") / "run")
    launch("python", 1, "zero2.json", _overrides(preprocessed, tokenizer_path, run_dir))
    return losses(run_dir)


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory, preprocessed, tokenizer_path):
    """STEPS steps by torchrun on node1 and node2, static rendezvous at node1."""
    tmp = tmp_path_factory.mktemp("two_hosts")
    run_dir = str(tmp / "run")
    done = _torchrun_on_both(cluster, _static(free_port()),
                             _train("zero2.json", _overrides(preprocessed, tokenizer_path, run_dir)), tmp / "logs")
    return {"run_dir": run_dir, "done": done}


@pytest.mark.slow
def test_torchrun_static_rendezvous_across_two_hosts_matches_one_process(uninterrupted, reference):
    done = uninterrupted["done"]
    assert "world 2 (env)" in done["node1"].stdout
    assert_close(losses(uninterrupted["run_dir"]), reference, rel=1e-5)


@pytest.mark.slow
def test_torchrun_c10d_across_two_hosts_checkpoints_and_resumes_bit_for_bit(cluster, uninterrupted, reference,
                                                                           tmp_path, preprocessed, tokenizer_path):
    run_dir = str(tmp_path / "run")
    for steps in (HALF, STEPS):  # the second run resumes from the first one's checkpoint on the shared filesystem
        done = _torchrun_on_both(cluster, _c10d(free_port()),
                                 _train("zero2.json", _overrides(preprocessed, tokenizer_path, run_dir, steps)),
                                 tmp_path / "logs")
        if steps == HALF:
            assert [s for s, _ in list_complete(os.path.join(run_dir, "checkpoints"))] == [HALF]
            assert_close(losses(run_dir), reference[:HALF], rel=1e-5)
    assert f"at step {HALF}" in "".join(d.stdout for d in done.values())
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, STEPS + 1))
    assert losses(run_dir) == losses(uninterrupted["run_dir"])


@pytest.mark.slow
def test_deepspeed_hostfile_over_pdsh_from_one_host_matches_one_process(cluster, reference, tmp_path, preprocessed,
                                                                        tokenizer_path):
    """As docs/cluster.md says: launch/hostfile.sh writes the hostfile and .deepspeed_env, `deepspeed --hostfile`
    started on node1 reaches both nodes over ssh (pdsh); .deepspeed_env carries PATH, OMP_NUM_THREADS,
    TORCH_EXTENSIONS_DIR ... to the ranks, whose ssh sessions start with a fresh environment."""
    job = tmp_path / "job"  # the working directory: .deepspeed_env is read from, and the ranks start in, it
    job.mkdir()
    logs = tmp_path / "logs"
    hosts = cluster.run(1, ["bash", os.path.join(ROOT, "launch", "hostfile.sh"), "--deepspeed-env", "node[1-2]", "1"],
                        logs, timeout=60, env=_env(), cwd=str(job)).stdout
    assert hosts == "node1 slots=1\nnode2 slots=1\n"
    (job / "hosts").write_text(hosts)
    forwarded = dict(line.split("=", 1) for line in (job / ".deepspeed_env").read_text().splitlines())
    assert forwarded["OMP_NUM_THREADS"] == "1" and forwarded["PATH"] == os.environ["PATH"]
    run_dir = str(tmp_path / "run")
    proc = cluster.run(1, ["deepspeed", "--hostfile", "hosts", "--master_port", str(free_port()),
                           *_train("zero2.json", _overrides(preprocessed, tokenizer_path, run_dir))],
                       logs, timeout=RUN_S, env=_env(), cwd=str(job))
    assert "node2: " in proc.stdout and "world 2 (env)" in proc.stdout
    assert_close(losses(run_dir), reference, rel=1e-5)


@pytest.mark.slow
def test_mpirun_across_two_hosts_with_mpi4py_matches_one_process(cluster, reference, tmp_path, preprocessed,
                                                                 tokenizer_path):
    """`mpirun -H node1,node2` from node1, its daemon on node2 started over ssh; no MASTER_ADDR: rank 0 (on node1)
    sends its host name and a port to the other rank with mpi4py."""
    pytest.importorskip("mpi4py", reason="mpi4py: .ci/run installs it")
    run_dir = str(tmp_path / "run")
    exports = [arg for var in ("PATH", "PYTHONPATH", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "WANDB_MODE")
               for arg in ("-x", var)]
    proc = cluster.run(1, ["mpirun", "-H", "node1,node2", "-np", "2", "--bind-to", "none", "--mca", "plm_rsh_agent",
                           "ssh", *exports, sys.executable,
                           *_train("zero2.json", _overrides(preprocessed, tokenizer_path, run_dir))],
                       tmp_path / "logs", timeout=RUN_S, env=_env())
    assert "world 2 (mpi)" in proc.stdout
    assert_close(losses(run_dir), reference, rel=1e-5)


@pytest.fixture(scope="module")
def slurm(cluster):
    """slurmctld on node1, a slurmd on each node (one CPU each), munged shared."""
    if missing_binaries():
        pytest.fail(f"SLURM is not installed ({', '.join(missing_binaries())}): .ci/run installs it")
    with SlurmCluster(cpus=1, nodes={n.name: n.ip for n in cluster.nodes},
                      on_node=lambda name, cwd: cluster.argv(name, [], cwd)) as on_two_hosts:
        yield on_two_hosts


@pytest.mark.slow
def test_sbatch_on_two_hosts_matches_one_process(slurm, reference, tmp_path, preprocessed, tokenizer_path):
    """slurm/train.sh as users submit it, one rank on each node: srun starts the rank on node2 through its slurmd,
    MASTER_ADDR is the allocation's first host."""
    run_dir = str(tmp_path / "run")
    job = slurm.sbatch(["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
                        f"--output={tmp_path}/%x-%j.out", os.path.join(ROOT, "slurm", "train.sh"),
                        "configs/tiny.yaml", os.path.join(DS, "zero2.json"),
                        *_overrides(preprocessed, tokenizer_path, run_dir)],
                       cwd=ROOT, env=process_env(_env(MEGAPILE_LOG_DIR=str(tmp_path / "logs"))))
    info = slurm.wait_for(job, {"COMPLETED"}, timeout=RUN_S)
    assert info["ExitCode"] == "0:0" and info["NodeList"] == "node[1-2]", info
    with open(tmp_path / f"megapile-{job}.out") as f:
        assert "2 node(s) × 1 process(es) = world 2, master node1:" in f.read()
    for rank, host in ((0, "node1"), (1, "node2")):
        with open(tmp_path / "logs" / f"megapile-{job}" / f"rank{rank}.log") as f:
            assert f"rank {rank}/2 on {host}" in f.read()
    assert_close(losses(run_dir), reference, rel=1e-5)
