"""Communication across two hosts: a 2-host ZeRO-2 run (torchrun on each of two simulated hosts, tests/cluster/)
with node2's link unlimited and rate-limited (default 100 Mbit/s), with ZeRO-2's overlap_comm off and on, side by
side. For each: the step time, its ratio to the unlimited link, the time an all-reduce of the gradient bytes takes
on that link, and the fraction of that communication hidden behind compute:

    hidden = 1 - (step time on the limited link - step time unlimited) / all-reduce time on the limited link

    sudo python bench/comm.py                       # 100mbit, 20 steps, a 4-layer 256-wide model
    sudo python bench/comm.py --rate 1gbit --steps 40

Needs root (namespaces) and the tools .ci/run installs (iproute2, util-linux, openssh-server, pdsh).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

import bench_data  # noqa: E402  (beside this script)
from cluster import Cluster, torchrun  # noqa: E402
from harness import free_port  # noqa: E402
from train_helpers import TRAIN, read_metrics, small_run_overrides  # noqa: E402

# The all-reduce of N fp32 gradients between the two hosts, repeated; prints the median seconds (rank 0)
ALL_REDUCE = """
import os, statistics, sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
grads = torch.zeros(int(sys.argv[1]))
times = []
for _ in range(6):
    dist.barrier(); t = time.perf_counter(); dist.all_reduce(grads); times.append(time.perf_counter() - t)
if dist.get_rank() == 0:
    print(f"ALLREDUCE {statistics.median(times[1:]):.6f}")
dist.destroy_process_group()
"""


def _env() -> dict:
    return {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def step_seconds(cluster: Cluster, data: dict, tok: str, work: str, name: str, args, overlap: bool) -> float:
    """Median step time (training only: tokens/s of each logged window after the first, a warm-up)."""
    run_dir = os.path.join(work, name)
    overrides = small_run_overrides(data, tok, run_dir, train__max_steps=args.steps, train__log_every=5,
                                    model__num_layers=args.layers, model__hidden_size=args.hidden,
                                    parallel__zero_stage=2, parallel__overlap_comm=overlap)
    torchrun.run_on_every_node(cluster, torchrun.static(free_port()), [TRAIN, *overrides], run_dir + "-logs",
                               _env(), timeout=3600)
    records = read_metrics(run_dir)
    samples = 8 * 32  # small_run_overrides: global batch 8 × seq_len 32
    return statistics.median(samples / r["tokens_per_s"] for r in records[1:])


def all_reduce_seconds(cluster: Cluster, numel: int, work: str) -> float:
    script = os.path.join(work, "all_reduce.py")  # torchrun runs a file, not -c
    with open(script, "w") as f:
        f.write(ALL_REDUCE)
    done = torchrun.run_on_every_node(cluster, torchrun.static(free_port()), [script, str(numel)],
                                      os.path.join(work, "allreduce-logs"), _env(), timeout=600)
    return float(done["node1"].stdout.split("ALLREDUCE ")[1].split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", default="100mbit", help="node2's link when limited (tc units)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/comm.py needs root: it simulates two hosts with network namespaces (tests/cluster/)")
    work = tempfile.mkdtemp(prefix="megapile_comm_")
    prefix, tok = bench_data.build(work)
    data = {"train": f"{prefix}_train", "valid": f"{prefix}_val"}
    from megapile.config import ModelConfig
    from megapile.model import meta_gpt

    numel = meta_gpt(ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_heads=4, max_seq_len=64,
                                 vocab_size=1024)).num_params(exclude_embedding=False)
    rows = []
    with Cluster(nodes=2) as cluster:
        links = {}
        for link in ("unlimited", args.rate):
            if link != "unlimited":
                cluster.rate_limit(2, link)
            links[link] = all_reduce_seconds(cluster, numel, work)
            for overlap in (False, True):
                rows.append((overlap, link, step_seconds(cluster, data, tok, work, f"{link}-{overlap}", args, overlap)))
        cluster.restore_link(2)
    base = {overlap: s for overlap, link, s in rows if link == "unlimited"}
    print(f"2 hosts × 1 rank, ZeRO-2, {numel / 1e6:.2f}M parameters ({numel * 4 / 2**20:.1f} MiB of fp32 gradients); "
          f"all-reduce of them: {links['unlimited'] * 1e3:.1f} ms unlimited, {links[args.rate] * 1e3:.1f} ms at {args.rate}")
    print(f"{'overlap_comm':>12} {'link':>10} {'step ms':>9} {'× unlimited':>12} {'exposed comm ms':>16} {'hidden':>7}")
    for overlap, link, s in rows:
        exposed = s - base[overlap]
        comm = links[link] - links["unlimited"]
        hidden = "" if link == "unlimited" else f"{max(0.0, min(1.0, 1 - exposed / comm)):.0%}" if comm > 0 else "n/a"
        print(f"{str(overlap):>12} {link:>10} {s * 1e3:9.1f} {s / base[overlap]:12.2f} {exposed * 1e3:16.1f} {hidden:>7}")


if __name__ == "__main__":
    main()
