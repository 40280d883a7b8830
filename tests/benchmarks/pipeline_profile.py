"""Where a `weakloc label` run spends its wall time, batch by batch, on the local runner.

    python -m tests.benchmarks.pipeline_profile --input 'shards/*.tfrecord' --model model.keras [label flags]

Runs one label job in this process (FnApiRunner) with timers around the inference step's parts and prints: the
time before the first batch (launch checks, model loading, job set-up, first decodes), the first batch (which
traces the compiled function), the steady loop over the other batches split into the model call, the box step
(`annotate_batch`) and everything between two batches (reading, decode hand-offs, Beam's per-element work, the
rows' way to Parquet), and the time after the last batch (combiners, Parquet finalisation, summary). The steady
loop's model time, divided by images, is the number to hold against the forward-pass limit of
`tests.benchmarks.throughput`. A measuring tool, never a test.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--output", default=None, help="default: a temporary directory")
    args, rest = ap.parse_known_args(argv)

    from weakloc.models import annotate
    from weakloc.pipeline import label
    from weakloc.transforms import inference

    stamps = []  # per batch: [start, end, model seconds, box seconds, images]
    current = {}

    class TimedModel:
        """The loaded model, with its calls timed."""

        def __init__(self, model):
            self._model = model

        def __call__(self, *a, **k):
            t = time.perf_counter()
            out = self._model(*a, **k)
            current["model"] = time.perf_counter() - t
            return out

        def __getattr__(self, name):
            return getattr(self._model, name)

    load, run_inference, annotate_batch = (inference.load_cam_model, inference.CamModelHandler.run_inference,
                                           annotate.annotate_batch)

    def timed_annotate(*a, **k):
        t = time.perf_counter()
        rows = annotate_batch(*a, **k)
        current["boxes"] = time.perf_counter() - t
        return rows

    def timed_run_inference(self, batch, model, inference_args=None):
        t = time.perf_counter()
        rows = run_inference(self, batch, model, inference_args)
        stamps.append((t, time.perf_counter(), current["model"], current["boxes"], len(batch)))
        return rows

    # Wrapped, not copied: the handler runs its own code, with timers around the model call and the box step.
    inference.load_cam_model = lambda spec, top_k: TimedModel(load(spec, top_k))
    annotate.annotate_batch = timed_annotate
    inference.CamModelHandler.run_inference = timed_run_inference
    output = args.output or tempfile.mkdtemp(prefix="weakloc-profile-")
    start = time.perf_counter()
    try:
        label.run(["--input", args.input, "--model", args.model, "--output", output, "--overwrite",
                   "--runner=FnApiRunner", *rest])
    finally:
        inference.load_cam_model, inference.CamModelHandler.run_inference = load, run_inference
        annotate.annotate_batch = annotate_batch
    end = time.perf_counter()
    if len(stamps) < 2:
        sys.exit("need at least two batches to separate the steady loop from the first")
    steady = stamps[1:]
    images = sum(s[4] for s in steady)
    doc = {
        "wall_s": end - start,
        "before_first_batch_s": stamps[0][0] - start,
        "first_batch_s": stamps[0][1] - stamps[0][0],
        "steady_batches": len(steady),
        "steady_images": images,
        "steady_loop_s": steady[-1][1] - steady[0][0],
        "model_s": sum(s[2] for s in steady),
        "boxes_s": sum(s[3] for s in steady),
        "rest_of_handler_s": sum(s[1] - s[0] - s[2] - s[3] for s in steady),
        "between_batches_s": sum(b[0] - a[1] for a, b in zip(steady, steady[1:])),
        "after_last_batch_s": end - stamps[-1][1],
    }
    doc["steady_img_s"] = images / doc["steady_loop_s"]
    doc["model_ms_per_image"] = 1000 * doc["model_s"] / images
    doc["model_share_of_steady_loop"] = doc["model_s"] / doc["steady_loop_s"]
    for key, val in doc.items():
        print(f"{key:28s} {val:10.3f}" if isinstance(val, float) else f"{key:28s} {val}")
    return doc


if __name__ == "__main__":
    main()
