"""Kill campaign at length: K SIGKILLs (default 50) of a random rank of a 2-rank training job at random
moments, restarting each time; prints faults injected / survived / steps lost and whether the finished run
equals the uninterrupted one bit for bit.

    python bench/faults.py --kills 50 --steps 400 [--async]

--async saves with checkpoint.async: the "save" and "seal" kills then land in the background write (the .tmp
folder exists from the snapshot to the commit) while training steps go on.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

import bench_data  # noqa: E402  (beside this script)
from faults.campaign import run_campaign, target  # noqa: E402
from harness import run_ranks  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--steps", type=int, default=400)  # long enough that K kills land before the end
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--async", dest="async_", action="store_true", help="checkpoint.async=true")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="megapile_faults_")
    prefix, tok = bench_data.build(work)
    from train_helpers import small_run_overrides

    def overrides(run_dir):
        return small_run_overrides({"train": f"{prefix}_train", "valid": f"{prefix}_val"}, tok, run_dir,
                                   train__max_steps=args.steps, checkpoint__every=2, optim__decay_steps=args.steps,
                                   model__dropout=0.1, checkpoint__async=args.async_)

    ds = os.path.join(ROOT, "ds_configs", "zero1.json")
    straight = os.path.join(work, "straight")
    run_ranks("torchrun", 2, target(ds, overrides(straight)), straight + "-logs", timeout=3600)
    faulty = os.path.join(work, "faulty")
    start = time.perf_counter()
    report = run_campaign(args.kills, ds, overrides(faulty), faulty, os.path.join(faulty, "checkpoints"),
                          seed=args.seed)
    from train_helpers import losses

    identical = losses(faulty) == losses(straight)
    print(report.line())
    print(f"per-step losses bit-identical to the uninterrupted run: {identical} "
          f"({len(losses(faulty))} steps, {time.perf_counter() - start:.0f} s)")
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if identical and report.survived == report.injected else 1)


if __name__ == "__main__":
    main()
