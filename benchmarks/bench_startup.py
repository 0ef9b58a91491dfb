"""CLI start-up: wall time of `surgery --help` and `surgery plan specs/recipes/unipelt.surg` (SmolLM2 on
the meta device), against the time to import torch and transformers' auto model class.

    anchor:  python -c "import torch, transformers; transformers.AutoModelForCausalLM"
    ours:    surgery --help;  surgery plan specs/recipes/unipelt.surg   (each a fresh process)

Every command is a fresh interpreter with OMP_NUM_THREADS=1, run from the checkout's root with it on
PYTHONPATH; the commands alternate round by round, so load from other processes hits them alike.
With ``--compare DIR`` (another checkout, e.g. ``git archive`` of an older commit unpacked there)
its two commands run in the same rounds, labelled ``before``. Prints per command the median and
the minimum of the rounds, and each as a ratio of the anchor's.

    python benchmarks/bench_startup.py [--repeats 5] [--compare DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The console script `surgery` runs exactly this (surgery.cli:main).
CLI = "import sys; sys.argv[0] = 'surgery'; from surgery.cli import main; main()"
ANCHOR = [sys.executable, "-c", "import torch, transformers; transformers.AutoModelForCausalLM"]


def commands(root: Path, label: str) -> dict[str, tuple[list[str], Path]]:
    cli = [sys.executable, "-c", CLI]
    return {f"{label} --help": ([*cli, "--help"], root),
            f"{label} plan unipelt": ([*cli, "plan", "specs/recipes/unipelt.surg"], root)}


def wall(cmd: list[str], cwd: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(cwd)}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compare", type=Path, help="another checkout, timed as 'before'")
    args = parser.parse_args()
    runs = {"anchor": (ANCHOR, ROOT)}
    if args.compare:
        runs |= commands(args.compare.resolve(), "before")
    runs |= commands(ROOT, "after" if args.compare else "ours")
    for cmd, cwd in runs.values():  # warm the file cache (and SmolLM2's config) once, untimed
        wall(cmd, cwd)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (cmd, cwd) in runs.items():
            times[name].append(wall(cmd, cwd))
    med = {name: statistics.median(t) for name, t in times.items()}
    low = {name: min(t) for name, t in times.items()}
    print(f"{'command':<22} {'median s':>9} {'min s':>7} {'median/anchor':>14} {'min/anchor':>11}")
    for name in runs:
        print(f"{name:<22} {med[name]:9.2f} {low[name]:7.2f} {med[name] / med['anchor']:14.2f} "
              f"{low[name] / low['anchor']:11.2f}")


if __name__ == "__main__":
    main()
