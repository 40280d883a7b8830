"""What co-localization costs beside a plain `label` run (issue 17: at most 1.5x), measured in one run.

    python benchmarks/coloc_throughput.py --input 'W/data/train-*.tfrecord' \
        --model ../shared/models/mobilenet_v2_imagenet.keras [--rounds 3] [--coloc_flags '--coloc_layer auto']

Each round runs, each as its own `weakloc label` process on the local runner (FnApiRunner), one after another:
plain CAM; `--method coloc` computing the statistics in the job (features kept, combined, side input, boxes);
`--method coloc --coloc_stats` reusing the statistics of that run (one pass). Wall time of the whole command
(start-up included) and the ratio to the plain run of the same round; the median round's ratios are the figures.
Prints a table and writes JSON (--out). Timings never go into tests.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _label(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "weakloc.pipeline.cli", "label", *argv, "--runner=FnApiRunner", "--overwrite"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--extra", default="--classes labels", help="flags for every run")
    ap.add_argument("--coloc_flags", default="", help="flags for the two co-localization runs only (e.g. "
                    "'--coloc_layer auto')")
    ap.add_argument("--out", help="JSON of every timing")
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="weakloc-coloc-bench-")
    base = ["--input", args.input, "--model", args.model, *args.extra.split()]
    stats_dir = os.path.join(work, "coloc")
    runs = {
        "cam": base + ["--output", os.path.join(work, "cam")],
        "coloc (statistics in the job)": base + ["--output", stats_dir, "--method", "coloc", *args.coloc_flags.split()],
        "coloc --coloc_stats (reused)": base + ["--output", os.path.join(work, "reuse"), "--method", "coloc",
                                                 "--coloc_stats", stats_dir, *args.coloc_flags.split()],
    }
    rounds = []
    for r in range(args.rounds):
        times = {name: _label(flags) for name, flags in runs.items()}
        rounds.append(times)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()), flush=True)
    ratios = {name: statistics.median(t[name] / t["cam"] for t in rounds) for name in runs}
    print("\nmedian over rounds of (run / plain CAM of the same round):")
    for name, ratio in ratios.items():
        print(f"  {name:32s} {ratio:5.2f}x   (median wall {statistics.median(t[name] for t in rounds):.1f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rounds": rounds, "median_ratio": ratios, "argv": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
