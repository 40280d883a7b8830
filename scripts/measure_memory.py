"""Peak memory of `weakloc label` against the number of images: is it bounded (flat in N)?

Builds N synthetic 48x48 PNG pictures in TFRecord shards of 1,000 records, a small seeded GAP model with its
sidecar, then runs `weakloc label` (FnApiRunner, one process) once per N in a fresh child process and reads the
child's peak resident set (ru_maxrss). Figures go to stdout as one JSON line per run and a closing table.

    python scripts/measure_memory.py --n 2000 20000 --workdir /tmp/weakloc-mem

Not a test: timings and memory depend on the machine and its load (see RELIABILITY.md for figures).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

SHARD_RECORDS = 1000


def make_inputs(workdir: str, n: int) -> str:
    from weakloc.models import records, synthetic

    d = os.path.join(workdir, f"shards-{n}")
    if os.path.isdir(d):
        return d
    os.makedirs(d + ".part")
    for s in range(0, n, SHARD_RECORDS):
        k = min(SHARD_RECORDS, n - s)
        data = synthetic.make_shapes(k, size=48, seed=s)
        with open(os.path.join(d + ".part", f"train-{s // SHARD_RECORDS:05d}.tfrecord"), "wb") as f:
            for i in range(k):
                f.write(records.frame_record(records.make_example(
                    synthetic.encode_png(data.images[i]), source_id=f"img-{s + i}", labels=[int(data.labels[i])])))
    os.rename(d + ".part", d)
    return d


def make_model(workdir: str) -> str:
    from weakloc.models import sidecar, synthetic, train

    path = os.path.join(workdir, "model", "shapes.keras")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        model = train.small_gap_cnn((48, 48), len(synthetic.SHAPES), width=8, seed=0)
        model.save(path)
        with open(sidecar.sidecar_path(path), "w") as f:
            f.write(sidecar.dumps(sidecar.Preprocessing((48, 48), 1 / 255, 0.0, synthetic.SHAPES)))
    return path


def measure(workdir: str, n: int, model: str, extra: list[str]) -> dict:
    shards = make_inputs(workdir, n)
    out = os.path.join(workdir, f"out-{n}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "weakloc.pipeline.cli", "label", "--input", os.path.join(shards, "*.tfrecord"),
           "--model", model, "--output", out, "--runner=FnApiRunner", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.time() - started
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        raise SystemExit(f"run with n={n} failed:\n{proc.stderr[-3000:]}")
    if peak_kb <= before:
        raise SystemExit("peak of this child not above earlier children's: run each N in its own invocation")
    with open(os.path.join(out, "summary.json")) as f:
        counts = json.load(f)["counts"]
    return {"n": n, "peak_rss_mb": round(peak_kb / 1024, 1), "wall_s": round(wall, 1),
            "annotated": counts["annotated"], "failed": counts["failed"], "balanced": counts["balanced"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[2000, 20000], help="image counts, measured in order")
    ap.add_argument("--workdir", default="/tmp/weakloc-mem")
    ap.add_argument("--isolated", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("beam_args", nargs="*", help="extra flags for weakloc label (after --)")
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not args.isolated:
        # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: one measuring process per N keeps them apart.
        model = make_model(args.workdir)
        rows = []
        for n in args.n:
            make_inputs(args.workdir, n)
            proc = subprocess.run([sys.executable, __file__, "--isolated", "--n", str(n), "--workdir", args.workdir,
                                   "--", *args.beam_args], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
        base = rows[0]
        print(f"\n{'images':>8} {'peak RSS MB':>12} {'vs first':>9} {'wall s':>7} {'annotated':>10} balanced")
        for r in rows:
            print(f"{r['n']:>8} {r['peak_rss_mb']:>12} {r['peak_rss_mb'] / base['peak_rss_mb'] - 1:>+9.1%} "
                  f"{r['wall_s']:>7} {r['annotated']:>10} {r['balanced']}")
        return 0
    model = make_model(args.workdir)
    print(json.dumps(measure(args.workdir, args.n[0], model, args.beam_args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
