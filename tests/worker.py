"""A fresh worker process, as a Beam runner starts one: it unpickles the CamModelHandler the launcher pickled,
loads its model and runs one batch. For the engine tests (which modules a worker imports) and the engine
benchmark (how long a worker takes to its first batch, and its memory)."""
from __future__ import annotations

import json
import os
import pickle
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = """
import json, pickle, resource, sys, time
t0 = time.perf_counter()
from apache_beam.internal import pickler
t_beam = time.perf_counter()
with open(sys.argv[1], "rb") as f:
    handler = pickler.loads(f.read())
with open(sys.argv[2], "rb") as f:
    batch = pickle.load(f)
model = handler.load_model()
t_model = time.perf_counter()
rows = handler.run_inference(batch, model)
t_batch = time.perf_counter()
first_batch_at = time.time()
print(json.dumps({"first_batch_at": first_batch_at,
    "imports_beam_s": t_beam - t0, "load_model_s": t_model - t_beam, "first_batch_s": t_batch - t_model,
    "modules": sorted(m for m in ("tensorflow", "keras", "tf_keras") if m in sys.modules),
    "optional_modules": sorted(m for m in ("scipy", "skimage") if m in sys.modules),
    "engine": [getattr(model, "engine", "tensorflow"), getattr(model, "precision", "f32")],
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "boxes": [[[b["class_id"], b["xmin"], b["ymin"], b["xmax"], b["ymax"]] for b in r["boxes"]] for r in rows]}))
"""


def run_pickled_worker(handler, batch, workdir: str, *, timeout: float = 600) -> dict:
    """Run `handler` on `batch` (DecodedInputs) in a fresh Python process. Returns the child's report (its own
    timings, the TensorFlow/Keras modules it imported and the optional ones (scipy, scikit-image) a worker on
    the default box mode should not need, engine and precision, peak RSS, boxes), `process_start_to_first_batch_s`,
    from starting the process here to the end of its first batch there (interpreter start included), and
    `wall_s`, which adds the child's exit (0.6 s with OpenVINO loaded; a Beam worker does not exit after a batch).

    Raises:
      RuntimeError: the worker failed (its stderr's tail in the message).
    """
    from apache_beam.internal import pickler

    handler_pkl, batch_pkl = os.path.join(workdir, "handler.pkl"), os.path.join(workdir, "batch.pkl")
    with open(handler_pkl, "wb") as f:
        f.write(pickler.dumps(handler))
    with open(batch_pkl, "wb") as f:
        pickle.dump(batch, f)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started_at = time.time()  # the child's clock is this one: both read the system's wall clock
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _SCRIPT, handler_pkl, batch_pkl], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(f"worker failed: {done.stderr[-2000:]}")
    # CPU seconds barely depend on what else the host runs; wall seconds do (a shared host can triple them).
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {"process_start_to_first_batch_s": report.pop("first_batch_at") - started_at, "wall_s": wall, "cpu_s": cpu,
            **report}
