"""Wall time of the gym's seeds in turn (one process, every torch thread) against side by side
(`vlmalign gym --jobs N`: one process per seed, the threads split between them), in one run.

    python scripts/bench_gym_jobs.py [--seeds 0,1] [--jobs 2] [--threads 2] [--videos 300] [--epochs 8] [--out DIR]

Both modes train the same seeds' SFT models (ceiling and start, no method) on one benchmark written
first and not timed (the demo's size by default), each mode with a feature cache of its own, so
both compute the same video features once. What users would do instead is run the seeds in turn
with torch's default threads, the first row. Run it on idle cores: anything else running skews
the two modes differently.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from vlmalign.cli import quiet_libraries
from vlmalign.gym import QUICK, run_seeds, write_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads in all")
    parser.add_argument("--videos", type=int, default=QUICK.videos)
    parser.add_argument("--epochs", type=int, default=QUICK.sft_epochs, help="SFT epochs of each model")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    quiet_libraries()
    seeds = [int(s) for s in args.seeds.split(",")]
    budget = dataclasses.replace(QUICK, videos=args.videos, sft_epochs=args.epochs, methods=())
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_gym_jobs_"))
    bench = out / "bench"
    if not (bench / "manifest.json").is_file():
        write_benchmark(bench, budget, progress=False)
    torch.set_num_threads(args.threads)
    seconds, starts = {}, {}
    for mode, jobs in (("in turn", 1), ("side by side", args.jobs)):
        began = time.perf_counter()
        runs = run_seeds(out / mode.replace(" ", "-"), budget, seeds, bench, progress=False, jobs=jobs)
        seconds[mode] = time.perf_counter() - began
        starts[mode] = [r["start"]["all"] for r in runs]
    print(f"\n{len(seeds)} seeds x 2 SFT models ({budget.videos} videos, {budget.sft_epochs} epochs), "
          f"{args.threads} torch threads in all, {torch.__version__}")
    for mode, jobs in (("in turn", 1), ("side by side", args.jobs)):
        print(f"  {mode:>12} ({jobs} process{'es' if jobs > 1 else ''}): {seconds[mode]:7.1f} s   "
              f"start accuracy per seed {starts[mode]}")
    print(f"  side by side / in turn: {seconds['side by side'] / seconds['in turn']:.2f}x the wall time")


if __name__ == "__main__":
    main()
