"""Every launcher against one process, on a real local SLURM cluster, OpenMPI and torchrun over loopback.

The SLURM tests run slurm/train.sh the way users submit it (2 CPU tasks, gloo): an uninterrupted job, a cancelled
job, a job that keeps crashing and is requeued only a bounded number of times, and a preprocessing array job (a
job signalled mid-run that checkpoints, requeues itself and resumes bit for bit runs on two hosts:
tests/test_cluster.py). Multi-node
correctness: srun with 2 tasks, torchrun as two "nodes" on loopback and mpirun -np 2 without mpi4py (with it: tests/test_cluster.py, across hosts)
must give the per-step losses of one process.
"""
import os
import shutil
import sys

import pytest
from harness import ROOT, free_port, process_env, run_command, start_command, wait_for
from slurm_cluster import MISSING_HELP, SlurmCluster, missing_binaries
from train_helpers import TRAIN, assert_close, launch, losses, read_metrics, small_run_overrides

STEPS = 20
DS = os.path.join(ROOT, "ds_configs")
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
MPI_HELP = "OpenMPI/mpi4py are not installed ({}): .ci/run installs them (apt-get install openmpi-bin libopenmpi-dev; pip install mpi4py)"


def _launcher_free(**extra) -> dict:
    """Changes to the test environment: no variable of an enclosing launcher (this suite may itself run under
    SLURM or mpirun), OpenMPI allowed as root; `extra` on top (None removes)."""
    env = {k: None for k in os.environ if k in LAUNCHER_VARS or k.startswith(("SLURM_", "OMPI_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.update(extra)
    return env


def _clean_env(**extra) -> dict:
    """The whole environment, for sbatch (the cluster passes it on to the job)."""
    return process_env(_launcher_free(**extra))


def _run(cmd, logs, timeout=300, check=True, cwd=ROOT, **env):
    """A launch script or launcher command line under test, through the harness (bounded, output kept)."""
    return run_command(cmd, logs, timeout=timeout, check=check, env=_launcher_free(**env), cwd=cwd)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, preprocessed, tokenizer_path):
    """STEPS steps in one plain process: the losses every launcher must reproduce."""
    run_dir = str(tmp_path_factory.mktemp("ref") / "run")
    launch("python", 1, "zero0.json", small_run_overrides(preprocessed, tokenizer_path, run_dir, train__max_steps=STEPS))
    return losses(run_dir)


@pytest.fixture(scope="module")
def slurm():
    missing = missing_binaries()
    if missing:
        pytest.fail(MISSING_HELP.format(names=", ".join(missing)))
    with SlurmCluster(cpus=2) as cluster:
        yield cluster


@pytest.fixture
def mpi():
    missing = [b for b in ("mpirun",) if shutil.which(b) is None]
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        missing.append("mpi4py")
    if missing:
        pytest.fail(MPI_HELP.format(", ".join(missing)))


def _submit_train(slurm, tmp_path, overrides, env=None, ds="zero2.json"):
    """sbatch slurm/train.sh as a user would, on 2 CPU tasks; batch and rank logs under tmp_path."""
    job = slurm.sbatch(["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10",
                        f"--output={tmp_path}/%x-%j.out", os.path.join(ROOT, "slurm", "train.sh"),
                        "configs/tiny.yaml", f"ds_configs/{ds}", *overrides],
                       cwd=ROOT, env=_clean_env(MEGAPILE_LOG_DIR=str(tmp_path / "logs"), **(env or {})))
    return job


@pytest.mark.slow
def test_a_second_cluster_starts_clean_and_stops_every_daemon(slurm):
    """CI may start the fixture more than once: fresh dirs and ports, and nothing left running after stop()."""
    with SlurmCluster(cpus=1) as second:
        assert second.root != slurm.root
        pids = [p.pid for p in second.procs.values()] + [second._pid(n) for n in second.procs]
        job = second.run(["sbatch", "--parsable", "--wait", f"--output={second.root}/%j.out", "--wrap", "true"],
                         cwd=second.root).stdout.strip()
        assert second.job(job)["JobState"] == "COMPLETED"
    for pid in pids:
        assert pid is not None and not os.path.exists(f"/proc/{pid}"), pid
    assert not os.path.exists(second.root)
    assert slurm.run(["sinfo", "-h", "-o", "%T"]).stdout.strip() in ("idle", "mixed")  # the first one is untouched


def _wait_for_steps(slurm, job, run_dir, steps):
    metrics = os.path.join(run_dir, "metrics.jsonl")

    def progressed() -> bool:
        if os.path.exists(metrics) and len(read_metrics(run_dir)) >= steps:
            return True
        assert slurm.job(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), slurm.job(job)
        return False

    wait_for(progressed, None, 180, f"{steps} logged steps", detail=lambda: f"{slurm.job(job)}", every=0.2)


def _batch_log(tmp_path, job):
    with open(tmp_path / f"megapile-{job}.out") as f:
        return f.read()


def _rank_log(tmp_path, job, rank):
    with open(tmp_path / "logs" / f"megapile-{job}" / f"rank{rank}.log") as f:
        return f.read()


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory, preprocessed, tokenizer_path):
    tmp_path = tmp_path_factory.mktemp("slurm_plain")
    run_dir = str(tmp_path / "run")
    job = _submit_train(slurm, tmp_path, small_run_overrides(preprocessed, tokenizer_path, run_dir,
                                                             train__max_steps=STEPS))
    info = slurm.wait_for(job, {"COMPLETED"}, timeout=240)
    return {"job": job, "info": info, "tmp": tmp_path, "run_dir": run_dir}


@pytest.mark.slow
def test_slurm_job_trains_checkpoints_and_finishes(uninterrupted, reference):
    job, tmp_path, run_dir = uninterrupted["job"], uninterrupted["tmp"], uninterrupted["run_dir"]
    assert uninterrupted["info"]["ExitCode"] == "0:0"
    assert uninterrupted["info"].get("Restarts", "0") == "0"
    batch = _batch_log(tmp_path, job)
    assert "restart 0, 1 node(s) × 2 process(es) = world 2" in batch
    assert "training finished" in batch and "checkpoint saved; requeueing" not in batch
    assert "world 2 (env)" in _rank_log(tmp_path, job, 0)
    assert "rank 1/2" in _rank_log(tmp_path, job, 1)
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        assert f.read().strip() == f"global_step{STEPS}"
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, STEPS + 1))
    assert_close(losses(run_dir), reference, rel=1e-5)


@pytest.mark.slow
def test_slurm_cancelled_job_saves_but_is_not_requeued(slurm, tmp_path, preprocessed, tokenizer_path):
    run_dir = str(tmp_path / "run")
    job = _submit_train(slurm, tmp_path, small_run_overrides(preprocessed, tokenizer_path, run_dir,
                                                             train__max_steps=STEPS))
    _wait_for_steps(slurm, job, run_dir, 3)
    slurm.run(["scancel", job])  # SIGTERM to the batch shell and every rank, as on preemption
    wait_for(lambda: "this script does not requeue it" in _batch_log(tmp_path, job), None, 60,
             '"does not requeue" in the batch log',
             detail=lambda: _batch_log(tmp_path, job), every=0.5)
    info = slurm.wait_for(job, {"CANCELLED"}, timeout=60)  # a requeued job (PENDING) never gets there
    assert info["JobState"] == "CANCELLED" and info.get("Restarts", "0") == "0", info
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        saved = int(f.read().strip().removeprefix("global_step"))
    assert 3 <= saved < STEPS, saved  # the ranks still saved before leaving


@pytest.mark.slow
def test_slurm_crashing_job_is_requeued_a_bounded_number_of_times(slurm, tmp_path, preprocessed, tokenizer_path):
    overrides = small_run_overrides(preprocessed, tokenizer_path, str(tmp_path / "run"), train__max_steps=STEPS,
                                    train__global_batch_size=7)  # every start fails: not a multiple of micro × dp
    job = _submit_train(slurm, tmp_path, overrides, env={"MEGAPILE_MAX_CRASHES": "1"})
    info = slurm.wait_for(job, {"FAILED"}, timeout=180)
    assert info["Restarts"] == "1" and info["ExitCode"] == "1:0", info
    batch = _batch_log(tmp_path, job)
    assert "crash 1 in a row" in batch and "2 times in a row: giving up" in batch
    assert "must be a multiple of" in _rank_log(tmp_path, job, 0)


@pytest.mark.slow
def test_slurm_preprocess_array_writes_one_dataset_per_shard(slurm, tmp_path, sample_corpus, tokenizer_path):
    shards = sorted(os.listdir(os.path.join(sample_corpus, "train")))
    assert len(shards) >= 2, shards
    prefix = tmp_path / "out dir" / "pile train"   # spaces: every path is quoted
    prefix.parent.mkdir()
    slurm.run(["sbatch", "--wait", f"--array=0-{len(shards) - 1}", "--cpus-per-task=1",
               f"--output={tmp_path}/pre-%A_%a.out", os.path.join(ROOT, "slurm", "preprocess.sh"),
               os.path.join(sample_corpus, "train", "*.jsonl.zst"), tokenizer_path, str(prefix)],
              cwd=ROOT, env=_clean_env(), timeout=180)
    from megapile.data.indexed import IndexedDataset

    total = 0
    for shard in shards:
        name = shard.split(".")[0]
        for ext in (".bin", ".idx"):
            assert os.path.exists(f"{prefix}_{name}{ext}"), (name, os.listdir(prefix.parent))
        total += len(IndexedDataset(f"{prefix}_{name}"))
    assert total > 0


@pytest.mark.slow
def test_srun_two_tasks_match_one_process(slurm, tmp_path, reference, preprocessed, tokenizer_path):
    """`srun -n 2 python megapile/train.py`: ranks and master come from SLURM_* alone (scontrol hostnames)."""
    run_dir = str(tmp_path / "run")
    proc = slurm.run(["srun", "--ntasks=2", "--cpus-per-task=1", "--gpus-per-node=0", sys.executable, TRAIN,
                      "--deepspeed_config", os.path.join(DS, "zero1.json"),
                      *small_run_overrides(preprocessed, tokenizer_path, run_dir, train__max_steps=STEPS)],
                     cwd=ROOT, env=_clean_env(), timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2 (slurm)" in proc.stdout
    assert_close(losses(run_dir), reference, rel=1e-5)


def _two_nodes(command_for_rank, logs):
    """Start node 1 and node 0 of a two-"node" job concurrently on this machine; both must succeed."""
    nodes = {rank: start_command(command_for_rank(rank), logs, f"node{rank}", env=_launcher_free()) for rank in (1, 0)}
    try:
        results = {rank: node.finish(timeout=300) for rank, node in nodes.items()}  # non-zero: fails with its output
    finally:
        for node in nodes.values():
            node.stop()
    assert "world 2 (env)" in results[0].stdout


@pytest.mark.slow
def test_torchrun_two_nodes_on_loopback_match_one_process(tmp_path, reference, preprocessed, tokenizer_path):
    """launch/torchrun.sh twice, as node 0 and node 1 of a 2-node job, rendezvous over 127.0.0.1."""
    run_dir = str(tmp_path / "run")
    master = f"127.0.0.1:{free_port()}"
    overrides = small_run_overrides(preprocessed, tokenizer_path, run_dir, train__max_steps=STEPS)
    _two_nodes(lambda rank: ["bash", os.path.join(ROOT, "launch", "torchrun.sh"), "--nnodes", "2", "--node_rank",
                             str(rank), "--master", master, "--nproc_per_node", "1", "configs/tiny.yaml",
                             os.path.join(DS, "zero2.json"), *overrides], tmp_path / "logs")
    assert_close(losses(run_dir), reference, rel=1e-5)


@pytest.mark.slow
def test_local_script_two_cpu_ranks_match_one_process(tmp_path, reference, preprocessed, tokenizer_path):
    run_dir = str(tmp_path / "run")
    proc = _run(["bash", os.path.join(ROOT, "launch", "local.sh"), "--nproc", "2", "configs/tiny.yaml",
                 os.path.join(DS, "zero3.json"),
                 *small_run_overrides(preprocessed, tokenizer_path, run_dir, train__max_steps=STEPS)],
                tmp_path / "logs", OMP_NUM_THREADS=None)  # the script splits the cores itself
    assert "2 process(es)" in proc.stdout and "world 2 (env)" in proc.stdout
    assert_close(losses(run_dir), reference, rel=1e-5)


@pytest.mark.slow
def test_deepspeed_hostfile_two_nodes_on_loopback_match_one_process(tmp_path, reference, preprocessed,
                                                                    tokenizer_path):
    """`deepspeed --hostfile` with a hostfile from launch/hostfile.sh naming two "nodes" (localhost and
    127.0.0.1), started once per node with --no_ssh --node_rank as on a cluster without ssh."""
    hosts = tmp_path / "hosts"
    hosts.write_text(_run(["bash", os.path.join(ROOT, "launch", "hostfile.sh"), "localhost,127.0.0.1", "1"],
                          tmp_path / "logs").stdout)
    assert hosts.read_text() == "localhost slots=1\n127.0.0.1 slots=1\n"
    run_dir = str(tmp_path / "run")
    port = str(free_port())
    overrides = small_run_overrides(preprocessed, tokenizer_path, run_dir, train__max_steps=STEPS)
    # deepspeed's own multi-node launcher is what is tested here: its command line, not the harness's
    _two_nodes(lambda rank: ["deepspeed", "--hostfile", str(hosts), "--no_ssh", "--node_rank", str(rank),
                             "--master_addr", "127.0.0.1", "--master_port", port, TRAIN,
                             "--deepspeed_config", os.path.join(DS, "zero2.json"), *overrides], tmp_path / "logs")
    assert_close(losses(run_dir), reference, rel=1e-5)


# `mpirun` with mpi4py choosing the master (no MASTER_ADDR): tests/test_cluster.py, across two hosts.


def _hide_mpi4py(tmp_path) -> str:
    shadow = tmp_path / "no_mpi4py" / "mpi4py"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('mpi4py hidden by the test')\n")
    return str(shadow.parent)


@pytest.mark.slow
def test_mpirun_script_without_mpi4py_matches_one_process(mpi, tmp_path, reference, preprocessed, tokenizer_path):
    """launch/mpirun.sh exports MASTER_ADDR/MASTER_PORT, so mpi4py is not needed."""
    run_dir = str(tmp_path / "run")
    proc = _run(["bash", os.path.join(ROOT, "launch", "mpirun.sh"), "-np", "2", "configs/tiny.yaml",
                 os.path.join(DS, "zero1.json"),
                 *small_run_overrides(preprocessed, tokenizer_path, run_dir, train__max_steps=STEPS)],
                tmp_path / "logs", PYTHONPATH=_hide_mpi4py(tmp_path), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()), MPIRUN_ARGS="--oversubscribe")
    assert "world 2 (mpi)" in proc.stdout
    assert_close(losses(run_dir), reference, rel=1e-5)


def _assert_one_line_error(proc, message):
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megapile: error:")]
    assert errors and all(message in line for line in errors), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_mpirun_without_mpi4py_or_master_is_a_one_line_error(mpi, tmp_path):
    proc = _run(["mpirun", "-np", "2", "--oversubscribe", sys.executable, TRAIN], tmp_path / "logs", check=False,
                timeout=120, PYTHONPATH=_hide_mpi4py(tmp_path))
    _assert_one_line_error(proc, "MASTER_ADDR is not set under mpirun and mpi4py is not installed")


@pytest.mark.parametrize("variables, message", [
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "MASTER_ADDR is not set"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "RANK=2 is not within WORLD_SIZE=2"),
])
def test_bad_launcher_environment_is_a_one_line_error(variables, message, tmp_path):
    proc = _run([sys.executable, TRAIN], tmp_path / "logs", check=False, timeout=120, cwd=tmp_path, **variables)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"megapile: error: {proc.stderr.split('megapile: error: ')[1].strip()}"]
    _assert_one_line_error(proc, message)
