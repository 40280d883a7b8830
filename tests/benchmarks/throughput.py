"""Throughput benchmark: how close weakloc runs to the speed of the model's own forward pass.

    python -m tests.benchmarks.throughput [--images 1024] [--batch_size 32] [--configs mobilenetv2,small]

For each configuration (model + images), everything is measured in one run so the ratios hold on a noisy machine:
  1. the limit: the model's compiled forward pass on preprocessed uint8 batches already in memory;
  2. weakloc end to end on the local runner (FnApiRunner), TFRecord shards in, Parquet out, each run a
     `weakloc label` command in its own process as a user runs it; and again with --decode_threads 0 (decoding
     between forward passes instead of ahead of them). Both run in --rounds interleaved rounds, each bracketed
     by the limit measured in a fresh process too, and the median round's ratio is the figure
     (`interleaved_rounds`);
  3. the same with --direct_num_workers=2 --direct_running_mode=multi_processing;
  4. Beam's stock RunInference + TFModelHandlerNumpy (classification only) through the same read and decode;
  5. per-image Grad-CAM from tf-keras-vis for the top class (what users of CAM libraries do today);
  6. the share of time in each stage, measured stage by stage in-process, and peak memory.
Needs tf-keras-vis and tensorflow-hub (both in the `test` extra). Prints a table and writes JSON (--out). Timings never go into tests.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

CONFIGS = {
    # name: (model builder, input size, image size (W, H), image format, classes)
    "mobilenetv2": ("mobilenetv2", (224, 224), (640, 480), "JPEG", 1000),
    "small": ("small", (96, 96), (96, 96), "PNG", 10),
}


def build_model(kind: str, input_size, num_classes: int):
    import keras

    keras.utils.set_random_seed(0)
    if kind == "mobilenetv2":
        # Random weights: speed does not depend on them, and nothing may be downloaded here.
        return keras.applications.MobileNetV2(weights=None, input_shape=(*input_size, 3), classes=num_classes)
    from weakloc.models.train import small_gap_cnn

    return small_gap_cnn(input_size, num_classes, width=16)


def make_images(n: int, size, fmt: str, seed: int = 0) -> list[bytes]:
    """Smooth random pictures (upsampled noise) so JPEG sizes and decode costs resemble photos."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (size[1] // 16 + 1, size[0] // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append(buf.getvalue())
    return out


def write_shards(images: list[bytes], directory: str, shards: int = 4) -> str:
    from weakloc.models import files, records

    files.write_tfrecord_shards((records.make_example(data, source_id=f"img{i:06d}") for i, data in enumerate(images)),
                                files.shard_paths(directory, "bench", shards))
    return os.path.join(directory, "bench-*.tfrecord")


def timed(fn, *args, repeat: int = 1):
    best = float("inf")
    result = None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - t)
    return best, result


def stage_times(model_path, prep, shard_glob, batch_size, tmp):
    """Each stage alone, in-process, over the same images: read, decode/resize, forward, CAM, boxes, write."""
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    from weakloc.models import annotate, images, records, schema
    from weakloc.models.cam import CamModel
    from weakloc.models.opening import load_keras_model

    from tensorflow.core.example import example_pb2  # noqa: F401  imported here, not inside the timed read

    def read():
        out = []
        for path in sorted(glob.glob(shard_glob)):
            with open(path, "rb") as f:
                out.extend(records.parse_example(d).encoded for _, d in records.iter_records(f))
        return out

    t_read, encoded = timed(read)
    t_decode, decoded = timed(lambda: [images.decode_image(e, prep["input_size"]) for e in encoded])
    pixels = np.stack([d.pixels for d in decoded])
    model = load_keras_model(model_path)
    scale, offset = prep["scale"], prep["offset"]
    forward = compiled_forward(model, prep)
    # Forward, CAM, boxes and write are timed on the first STAGE_IMAGES images and scaled to all of them: five
    # interleaved rounds over 2,048 MobileNetV2 images took 11 minutes on a slow host, for the same shares.
    sub = pixels[:STAGE_IMAGES]
    per_all = len(pixels) / len(sub)
    batches = [sub[i : i + batch_size] for i in range(0, len(sub), batch_size)]
    forward(batches[0])
    cam = CamModel(model, input_size=prep["input_size"], scale=scale, offset=offset)
    cam(batches[0])
    # CAM's cost is the small difference of two large times, so both are measured batch by batch, interleaved,
    # and each batch keeps its best of 5 rounds: a burst of load on a shared machine then lands on neither side.
    # The limit itself is the best of the 5 rounds' forward passes over all batches: a sustained rate, as the
    # pipeline has to sustain it (the sum of per-batch bests would be 5-7% faster than any real pass).
    fwd = np.zeros((5, len(batches)))
    cam_t = np.zeros((5, len(batches)))
    outs = [None] * len(batches)
    for r in range(5):
        for j, b in enumerate(batches):
            fwd[r, j] = timed(lambda: forward(b).numpy())[0]
            cam_t[r, j], outs[j] = timed(cam, b)
    t_forward, t_fwd_cam = per_all * float(fwd.min(axis=0).sum()), per_all * float(cam_t.min(axis=0).sum())
    t_limit, t_limit_cam = float(fwd.sum(axis=1).min()), float(cam_t.sum(axis=1).min())
    opts = annotate.BoxOptions()
    metas = [annotate.ImageMeta(f"img{i}", "s", d.width, d.height) for i, d in enumerate(decoded)]
    names = tuple(prep["class_names"])

    def boxes(keep=False):
        # As in the pipeline, each batch's rows are handed on (here: dropped) before the next batch is boxed;
        # holding all of them would time Python's garbage collector walking an ever larger heap.
        rows, i = [], 0
        for o in outs:
            n = len(o.scores)
            extra = np.zeros((n, 0), np.int32)
            batch = annotate.annotate_batch(o, metas[i : i + n], names, opts, "m", extra)
            if keep:
                rows += batch
            i += n
        return rows

    t_boxes, _ = timed(boxes, repeat=5)
    rows = boxes(keep=True)
    t_write, _ = timed(lambda: pq.write_table(pa.Table.from_pylist(rows, schema.ANNOTATION_SCHEMA),
                                              os.path.join(tmp, "stage.parquet"), compression="snappy"))
    return {
        "pixels": pixels,
        "read": t_read,
        "decode_resize": t_decode,
        "forward": t_forward,
        "cam": max(t_fwd_cam - t_forward, 0.0),
        "boxes": per_all * t_boxes,
        "write": per_all * t_write,
        "forward_limit_img_s": len(sub) / t_limit,
        "forward_plus_cam_img_s": len(sub) / t_limit_cam,
    }


def compiled_forward(model, prep):
    """The limit's function: the model's own forward pass, compiled, on uint8 batches (preprocessing inside)."""
    import tensorflow as tf

    scale, offset = prep["scale"], prep["offset"]

    @tf.function(input_signature=[tf.TensorSpec([None, *prep["input_size"], 3], tf.uint8)])
    def forward(x):
        return model(tf.cast(x, tf.float32) * scale + offset, training=False)

    return forward


def forward_limit(model_path, prep, pixels, batch_size, rounds: int = 2) -> float:
    """images/s of the best of `rounds` sustained forward passes over `pixels` (as in `stage_times`)."""
    from weakloc.models.opening import load_keras_model

    forward = compiled_forward(load_keras_model(model_path), prep)
    batches = [pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)]
    forward(batches[0])
    return len(pixels) / timed(lambda: [forward(b).numpy() for b in batches], repeat=rounds)[0]


# The fresh-process limit passes over at most this many preprocessed images (best of two sustained passes).
LIMIT_IMAGES = 512
# The in-process stage timings run on at most this many images and are scaled to the rest (`stage_times`).
STAGE_IMAGES = 1024


def limit_process(model_path, prep, pixels_path, batch_size, log_path) -> float:
    """`forward_limit` in a fresh process, as each `weakloc label` run gets one: images/s.

    The pixels are the benchmark's own decoded images (saved once with np.save), loaded into memory first.
    """
    out = log_path + ".json"
    _call_in_process("_limit_main", [model_path, prep, pixels_path, batch_size, out], log_path)
    with open(out) as f:
        return float(json.load(f)["img_s"])


def _limit_main(model_path, prep, pixels_path, batch_size, out):
    prep = {**prep, "input_size": tuple(prep["input_size"])}
    img_s = forward_limit(model_path, prep, np.load(pixels_path), batch_size)
    with open(out, "w") as f:
        json.dump({"img_s": img_s}, f)


def _call_in_process(function: str, args: list, log_path) -> float:
    """Seconds to run `function(*args)` of this module in a fresh process; args go as JSON (prep's input_size as a
    list, turned back into a tuple by the function)."""
    args = [{**a, "input_size": list(a["input_size"])} if isinstance(a, dict) and "input_size" in a else a
            for a in args]
    return _timed_process(["-c", f"import json, sys; from tests.benchmarks.throughput import {function}; "
                                 f"{function}(*json.loads(sys.argv[1]))", json.dumps(args)], log_path)


def _timed_process(args, log_path) -> float:
    """Seconds to run a Python command in a fresh process (interpreter start and imports included)."""
    t = time.perf_counter()
    with open(log_path, "w") as log:
        done = subprocess.run([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                              cwd=_REPO_ROOT, env={**os.environ, "PYTHONPATH": _REPO_ROOT})
    seconds = time.perf_counter() - t
    if done.returncode:
        raise RuntimeError(f"{args[:3]} failed with exit code {done.returncode}; see {log_path}")
    return seconds


def run_weakloc(shard_glob, model_path, out, batch_size, extra=()):
    """`weakloc label` in its own process, as a user runs it. Returns (seconds, summary).

    Each run gets a fresh process: in a long-lived benchmark process the pipeline's forward pass ran up to 10%
    slower once other models had been loaded beside it, which would charge the benchmark's own state to weakloc.
    """
    seconds = _timed_process(["-m", "weakloc.pipeline.cli", "label", "--input", shard_glob, "--model", model_path,
                              "--output", out, "--batch_size", str(batch_size), "--overwrite", *extra],
                             out.rstrip("/") + ".log")
    from weakloc.pipeline import results

    return seconds, results.read_summary(out)  # summary.json with the runner's metrics (metrics.json)


def run_stock_process(shard_glob, model_path, prep, out, batch_size) -> float:
    """`run_stock` in its own process, timed like `run_weakloc`."""
    return _call_in_process("run_stock", [shard_glob, model_path, prep, out, batch_size], out.rstrip("/") + ".log")


def run_stock(shard_glob, model_path, prep, out, batch_size):
    """What a user would otherwise build: same read + decode, then stock RunInference for classes only."""
    import apache_beam as beam
    import pyarrow as pa
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerNumpy

    from weakloc.transforms.decode import DecodeDoFn
    from weakloc.transforms.read import ReadInputs

    scale, offset = prep["scale"], prep["offset"]
    handler = TFModelHandlerNumpy(model_path, min_batch_size=batch_size, max_batch_size=batch_size)
    schema = pa.schema([("image_id", pa.string()), ("class_id", pa.int32()), ("score", pa.float32())])

    def to_row(pair):
        meta, pred = pair
        c = int(np.argmax(pred.inference))
        return {"image_id": meta.image_id, "class_id": c, "score": float(pred.inference[c])}

    t = time.perf_counter()
    with beam.Pipeline(runner="FnApiRunner") as p:
        raw = (p | ReadInputs([shard_glob], "tfrecord"))["inputs"]
        decoded = raw | beam.ParDo(DecodeDoFn(prep["input_size"], prep["class_names"]))
        keyed = decoded | beam.Map(lambda d: (d.meta, d.pixels.astype(np.float32) * scale + offset))
        from apache_beam.ml.inference.base import KeyedModelHandler

        preds = keyed | RunInference(KeyedModelHandler(handler))
        preds | beam.Map(to_row) | beam.io.WriteToParquet(os.path.join(out, "stock"), schema,
                                                          file_name_suffix=".parquet")
    return time.perf_counter() - t


def run_tf_keras_vis(model_path, prep, encoded, n):
    """Per-image Grad-CAM of the top class with tf-keras-vis, decode included (as its users do)."""
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
    from tf_keras_vis.utils.scores import CategoricalScore

    from weakloc.models import images
    from weakloc.models.opening import load_keras_model

    model = load_keras_model(model_path)
    gradcam = Gradcam(model, model_modifier=ReplaceToLinear(), clone=True)

    def one(data):
        x = images.decode_image(data, prep["input_size"]).pixels[None].astype(np.float32)
        x = x * prep["scale"] + prep["offset"]
        top = int(np.argmax(model(x, training=False)[0]))
        return gradcam(CategoricalScore([top]), x)

    one(encoded[0])  # warm-up (graph building) is not counted
    t = time.perf_counter()
    for data in encoded[1 : n + 1]:
        one(data)
    return n / (time.perf_counter() - t)


def bench_config(name, n, batch_size, n_gradcam, workdir, rounds: int = 3):
    kind, input_size, image_size, fmt, classes = CONFIGS[name]
    d = os.path.join(workdir, name)
    os.makedirs(d, exist_ok=True)
    model = build_model(kind, input_size, classes)
    model_path = os.path.join(d, "model.keras")
    model.save(model_path)
    prep = {"input_size": list(input_size), "scale": 1 / 127.5, "offset": -1.0,
            "class_names": [f"c{i}" for i in range(classes)]}
    with open(os.path.join(d, "model.json"), "w") as f:
        json.dump(prep, f)
    prep["input_size"] = tuple(input_size)
    encoded = make_images(n, image_size, fmt)
    shard_glob = write_shards(encoded, os.path.join(d, "shards"))
    # A quarter of the images as a second input: the difference between the two runs is the marginal rate,
    # free of start-up (model loading and tracing on each worker, launch-time validation, job set-up).
    n_small = max(n // 4, 1)
    small_glob = write_shards(encoded[:n_small], os.path.join(d, "shards_small"))
    mean_bytes = sum(map(len, encoded)) / n

    stages = stage_times(model_path, prep, shard_glob, batch_size, d)
    pixels_path = os.path.join(d, "pixels.npy")
    np.save(pixels_path, stages.pop("pixels")[:LIMIT_IMAGES])

    def both(fn, *args):
        """(seconds for n images, marginal images/s, fixed start-up seconds) from a run over n and one over n/4,
        each in a fresh process: start-up here includes the interpreter and its imports, as a user's job does."""
        t_all = fn(shard_glob, *args)
        return (t_all, *marginal_rate(n, n_small, t_all, fn(small_glob, *args)))

    def local_run(glob_, name, extra=()):
        t, summary = run_weakloc(glob_, model_path, os.path.join(d, name), batch_size,
                                 ["--runner=FnApiRunner", *extra])
        assert summary["counts"]["annotated"] in (n, n_small), summary["counts"]
        return {"seconds": t, "steady_img_s": summary.get("throughput", {}).get("steady_images_per_s")}

    def mp_run(glob_, name):
        return run_weakloc(glob_, model_path, os.path.join(d, name), batch_size,
                           ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])[0]

    # The two local variants (decoding ahead, the default, and decoding between forward passes) in interleaved
    # rounds, each round bracketed by the limit measured in a fresh process like the runs themselves.
    local = interleaved_rounds(
        rounds,
        lambda: limit_process(model_path, prep, pixels_path, batch_size, os.path.join(d, "limit.log")),
        {"default": lambda big: local_run(shard_glob if big else small_glob, "out_local"),
         "sequential_decode": lambda big: local_run(shard_glob if big else small_glob, "out_seq",
                                                    ["--decode_threads", "0"])},
        n, n_small)
    t_mp, mp_marginal, mp_fixed = both(mp_run, "out_mp")
    t_stock, stock_marginal, stock_fixed = both(
        lambda glob_, name: run_stock_process(glob_, model_path, prep, os.path.join(d, name), batch_size),
        "out_stock")
    try:
        gradcam_img_s = run_tf_keras_vis(model_path, prep, encoded, n_gradcam)
    except ImportError as exc:
        gradcam_img_s = None
        print(f"  tf-keras-vis unavailable ({exc}); pip install '.[test]'", file=sys.stderr)

    # Single measurements (two worker processes, stock RunInference) are held against the median limit.
    limit = float(np.median(local["limits_img_s"]))
    default, seq = local["default"], local["sequential_decode"]
    whole = default["whole_run_img_s_median"]
    total_stage = sum(stages[k] for k in ("read", "decode_resize", "forward", "cam", "boxes", "write"))
    cam_boxes = (stages["cam"] + stages["boxes"]) / stages["forward"]
    vs_stock = whole / (n / t_stock)
    vs_gradcam = (whole / gradcam_img_s) if gradcam_img_s else None
    return {
        "config": name,
        "model_input": list(input_size),
        "images": n,
        "image_size": list(image_size),
        "image_format": fmt,
        "mean_image_bytes": round(mean_bytes),
        "batch_size": batch_size,
        "rounds": rounds,
        "forward_limit_img_s": limit,
        "forward_limit_each_img_s": local["limits_img_s"],
        "forward_limit_in_process_img_s": stages["forward_limit_img_s"],
        "forward_plus_cam_img_s": stages["forward_plus_cam_img_s"],
        "weakloc_local_img_s": whole,
        "weakloc_local_vs_limit": default["whole_run_vs_limit_median"],
        "weakloc_local_marginal_img_s": default["marginal_img_s_median"],
        "weakloc_local_marginal_vs_limit": default["marginal_vs_limit_median"],
        "weakloc_local_marginal_vs_limit_each": [r["marginal_vs_limit"] for r in default["rounds"]],
        "weakloc_local_steady_img_s": default["steady_img_s_median"],
        "weakloc_local_steady_vs_limit": default["steady_vs_limit_median"],
        "weakloc_local_steady_vs_limit_each": [r["steady_vs_limit"] for r in default["rounds"]],
        "weakloc_local_startup_s": default["startup_s_median"],
        "weakloc_local_sequential_decode_img_s": seq["whole_run_img_s_median"],
        "weakloc_local_sequential_decode_marginal_img_s": seq["marginal_img_s_median"],
        "weakloc_local_sequential_decode_marginal_vs_limit": seq["marginal_vs_limit_median"],
        "weakloc_local_sequential_decode_marginal_vs_limit_each": [r["marginal_vs_limit"] for r in seq["rounds"]],
        "weakloc_local_sequential_decode_steady_vs_limit": seq["steady_vs_limit_median"],
        "weakloc_mp2_img_s": n / t_mp,
        "weakloc_mp2_vs_limit": (n / t_mp) / limit,
        "weakloc_mp2_marginal_img_s": mp_marginal,
        "weakloc_mp2_marginal_vs_limit": mp_marginal / limit,
        "weakloc_mp2_startup_s": mp_fixed,
        "stock_runinference_img_s": n / t_stock,
        "stock_runinference_marginal_img_s": stock_marginal,
        "stock_runinference_startup_s": stock_fixed,
        "weakloc_vs_stock": vs_stock,
        "weakloc_vs_stock_marginal": default["marginal_img_s_median"] / stock_marginal,
        "tf_keras_vis_gradcam_img_s": gradcam_img_s,
        "weakloc_vs_gradcam": vs_gradcam,
        "cam_plus_boxes_share_of_forward": cam_boxes,
        "stage_share": {k: stages[k] / total_stage for k in ("read", "decode_resize", "forward", "cam", "boxes",
                                                              "write")},
        "stage_seconds": {k: stages[k] for k in ("read", "decode_resize", "forward", "cam", "boxes", "write")},
        "local_rounds": local,
        "targets": {
            # Issue 6 sets the end-to-end target for MobileNetV2-224; for other models the ratio is information.
            **({"end to end (steady loop of a run) >= 0.85 of the limit":
                _target(default["steady_vs_limit_median"], 0.85),
                "end to end (marginal between runs) >= 0.85 of the limit":
                _target(default["marginal_vs_limit_median"], 0.85)} if name == "mobilenetv2" else {}),
            "CAM + boxes <= 5% of the forward time": _target(cam_boxes, 0.05, at_most=True),
            ">= 0.95 of stock RunInference (whole runs)": _target(vs_stock, 0.95),
            ">= 3x tf-keras-vis Grad-CAM": _target(vs_gradcam, 3.0),
        },
    }


def _target(value, bound, *, at_most=False):
    if value is None:
        return {"value": None, "met": None}
    return {"value": value, "met": bool(value <= bound if at_most else value >= bound)}


def marginal_rate(n: int, n_small: int, t_all: float, t_few: float) -> tuple[float, float]:
    """(images/s, start-up seconds) from runs over n and n_small images taking t_all and t_few seconds: the extra
    images over the extra time, and what the small run took beyond its images at that rate."""
    marginal = (n - n_small) / max(t_all - t_few, 1e-9)
    return marginal, max(t_few - n_small / marginal, 0.0)


def interleaved_rounds(rounds: int, limit, variants: dict, n: int, n_small: int) -> dict:
    """End-to-end variants measured in rounds, each bracketed by the limit, so drift lands on both sides.

    The host's speed drifts by 5-10% over minutes, more than the margin a 0.85 target leaves; one pair of runs
    set against a limit measured minutes away reads anywhere from 0.71 to 0.84 for the same code. Here every
    round measures the limit, then each variant over n and over n/4 images (fresh processes), and the limit is
    measured once more after the last round. A round's ratios divide by the mean of the two limits around it;
    the median over rounds is the figure, and every round's is kept. Two end-to-end rates per round:
      marginal: the n - n/4 more images over the difference of the two runs' wall times (start-up cancels,
        but its run-to-run spread, several seconds in a fresh process, does not);
      steady: the run's own rate from its first batch's end to its last's (`summary.json` "throughput", from
        the pipeline's metrics), over n images: every per-image stage, from reading to Parquet rows, and no
        start-up.

    limit: () -> images/s; variants: {name: (big: bool) -> {"seconds": wall time of a run over n (True) or n/4
    images, "steady_img_s": that run's steady rate or None}}.
    """
    limits = [limit()]
    pairs: dict = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            pairs[name].append((run(True), run(False)))
        limits.append(limit())
    out: dict = {"limits_img_s": limits}
    for name, runs in pairs.items():
        rows = []
        for r, (big, few) in enumerate(runs):
            lim = (limits[r] + limits[r + 1]) / 2
            t_all, t_few, steady = big["seconds"], few["seconds"], big.get("steady_img_s") or float("nan")
            marginal, startup = marginal_rate(n, n_small, t_all, t_few)
            rows.append({"limit_img_s": lim, "seconds": t_all, "seconds_small": t_few, "marginal_img_s": marginal,
                         "marginal_vs_limit": marginal / lim, "steady_img_s": steady, "steady_vs_limit": steady / lim,
                         "whole_run_img_s": n / t_all, "whole_run_vs_limit": n / t_all / lim,
                         "startup_s": startup})
        out[name] = {"rounds": rows, **{f"{key}_median": float(np.median([row[key] for row in rows]))
                                        for key in ("marginal_img_s", "marginal_vs_limit", "steady_img_s",
                                                    "steady_vs_limit", "whole_run_img_s", "whole_run_vs_limit",
                                                    "startup_s")}}
    return out


def sweeps(workdir: str, n: int = 128) -> dict:
    """How the cost grows: decode with image size (draft on/off), forward+CAM with batch size, CAM+boxes with
    top-k. In-process and per stage, MobileNetV2-224 with random weights."""
    import tensorflow as tf

    from weakloc.models import annotate, images
    from weakloc.models.cam import CamModel

    out = {"decode_ms_per_image": {}, "forward_img_s": {}, "cam_boxes_ms_per_image": {}}
    for size in ((320, 240), (640, 480), (1280, 960), (2560, 1920)):
        enc = make_images(max(n // 4, 8), size, "JPEG", seed=1)
        for draft in (True, False):
            t, _ = timed(lambda: [images.decode_image(e, (224, 224), draft=draft) for e in enc], repeat=2)
            out["decode_ms_per_image"][f"{size[0]}x{size[1]} draft={draft}"] = 1000 * t / len(enc)
    model = build_model("mobilenetv2", (224, 224), 1000)
    pixels = np.random.default_rng(0).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)

    @tf.function(input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.uint8)])
    def forward(x):
        return model(tf.cast(x, tf.float32) / 127.5 - 1.0, training=False)

    for bs in (1, 8, 32, 64):
        batches = [pixels[i : i + bs] for i in range(0, min(n, 16 * bs) if bs < 8 else n, bs)]
        forward(batches[0])
        t, _ = timed(lambda: [forward(b).numpy() for b in batches], repeat=2)
        out["forward_img_s"][bs] = sum(len(b) for b in batches) / t
    names = tuple(f"c{i}" for i in range(1000))
    metas = [annotate.ImageMeta(f"i{i}", "s", 640, 480) for i in range(32)]
    for k in (1, 3, 5):
        cam = CamModel(model, input_size=(224, 224), scale=1 / 127.5, offset=-1.0, top_k=k)
        batch = pixels[:32]
        cam(batch)
        t_fwd, _ = timed(lambda: forward(batch).numpy(), repeat=3)
        t_cam, o = timed(lambda: cam(batch), repeat=3)
        opts = annotate.BoxOptions(top_k=k)
        t_box, _ = timed(lambda: annotate.annotate_batch(o, metas, names, opts, "m", np.zeros((32, 0), np.int32)),
                         repeat=3)
        out["cam_boxes_ms_per_image"][k] = {"cam": 1000 * max(t_cam - t_fwd, 0) / 32, "boxes": 1000 * t_box / 32,
                                            "forward": 1000 * t_fwd / 32}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="mobilenetv2,small")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--gradcam_images", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds of limit and end-to-end runs; the median round is reported")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--sweep", action="store_true",
                    help="also measure how stage costs grow with image size, batch size and top-k")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    workdir = args.workdir or tempfile.mkdtemp(prefix="weakloc-bench-")
    results = []
    for name in args.configs.split(","):
        print(f"== {name}: {args.images} images, batch {args.batch_size}", flush=True)
        r = bench_config(name, args.images, args.batch_size, args.gradcam_images, workdir, args.rounds)
        results.append(r)
        for key, val in r.items():
            if key == "local_rounds":  # every round's figures are in the JSON; the lists above summarise them
                continue
            if key == "targets":
                for target, got in val.items():
                    shown = "n/a" if got["value"] is None else f"{got['value']:.3f}"
                    verdict = {True: "met", False: "NOT met", None: "not measured"}[got["met"]]
                    print(f"  target: {target:46s} {shown:>8s}  {verdict}")
            elif isinstance(val, float):
                print(f"  {key:34s} {val:10.3f}")
            elif isinstance(val, dict):
                print(f"  {key:34s} " + ", ".join(f"{k} {v:.3f}" for k, v in val.items()))
            elif isinstance(val, list) and val and isinstance(val[0], float):
                print(f"  {key:34s} " + ", ".join(f"{v:.3f}" for v in val))
            else:
                print(f"  {key:34s} {val}")
    sweep = None
    if args.sweep:
        print("== sweeps (MobileNetV2-224, in-process)", flush=True)
        sweep = sweeps(workdir)
        for name, table in sweep.items():
            print(f"  {name}: " + ", ".join(f"{k}: {v if isinstance(v, dict) else round(v, 2)}" for k, v in table.items()))
    peak = {
        "self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    print(f"peak RSS: this process {peak['self_mb']:.0f} MB, largest child {peak['children_mb']:.0f} MB")
    doc = {"results": results, "sweeps": sweep, "peak_rss": peak, "cpus": os.cpu_count(), "argv": sys.argv[1:]}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
    return doc


if __name__ == "__main__":
    main()
