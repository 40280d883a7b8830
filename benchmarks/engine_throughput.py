"""Engines side by side (issue 14): weakloc end to end on TensorFlow, OpenVINO (f32, bf16) and LiteRT (f32), each
engine's own forward limit, a fresh worker's start-up and memory, and the stage shares once the forward pass is faster.

    python benchmarks/engine_throughput.py [--images 512] [--rounds 2] [--batch_size 32] [--out figures.json]
    python benchmarks/engine_throughput.py --startup_only [--startup_reps 3]   # fresh workers' start-up alone

MobileNetV2-224 (random weights: speed does not depend on them) on 640x480 JPEG TFRecords, as
tests/benchmarks/throughput.py. Everything in one run, in interleaved rounds: each round measures every limit in
a fresh process (the fused CAM graph on decoded batches already in memory) and then every variant end to end as
`weakloc label` processes over n and n/4 images; a round's ratios use that round's limits, and the median round
is the figure. Ratios only: the host is shared and its speed drifts. Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from unittest import mock

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tests.benchmarks.throughput import (  # noqa: E402
    build_model, make_images, marginal_rate, run_weakloc, timed, write_shards)

VARIANTS = {  # name: label flags
    "tensorflow": ["--engine", "tensorflow"],
    "openvino_default": ["--engine", "openvino"],  # --precision auto: f32 (bf16 misses the agreement targets)
    "openvino_latency": ["--engine", "openvino"],  # f32 under the LATENCY hint (the default before 2026-12-04)
    "openvino_bf16": ["--engine", "openvino", "--precision", "bf16"],
    "litert": ["--engine", "litert"],  # f32 only
}
LIMITS = ("tensorflow", "openvino_f32", "openvino_f32-latency", "openvino_bf16", "litert_f32")
# Which limit each end-to-end variant is held against.
OWN_LIMIT = {"tensorflow": "tensorflow", "openvino_default": "openvino_f32", "openvino_latency": "openvino_f32-latency",
             "openvino_bf16": "openvino_bf16", "litert": "litert_f32"}
# The environment of a variant or limit run beside the default (models/engines/openvino.py's hint).
ENV = {"openvino_latency": {"WEAKLOC_OPENVINO_HINT": "latency"},
       "openvino_f32-latency": {"WEAKLOC_OPENVINO_HINT": "latency"}}


def _env(name):
    """os.environ with `name`'s ENV entries set, for the children started inside."""
    return mock.patch.dict(os.environ, ENV.get(name, {}))


def _method(model_path, prep):
    from weakloc.models import opening

    return opening.open_model(model_path).build(top_k=1)


def _forward_of(engine_name, model_path, prep, cache_dir):
    """(callable on uint8 batches, description): the fused CAM graph on TensorFlow or the converted one."""
    method = _method(model_path, prep)
    if engine_name == "tensorflow":
        return (lambda b: method(b)), "tensorflow"
    from weakloc.models import engines, opening
    from weakloc.models.engines import cache
    from weakloc.pipeline.engine import method_options

    name, precision = engine_name.split("-")[0].split("_")
    engine = engines.get(name)
    spec = opening.open_model(model_path).spec
    path, _ = cache.cached_convert(engine, cache.cache_key(engine, cache.model_digest(spec), method_options(spec, 1)),
                                   method, directory=cache_dir)
    with open(path, "rb") as f:
        model = engines.EngineCam(engine.load(f.read(), precision), input_size=method.input_size,
                                  num_classes=method.num_classes, engine=name, precision=precision)
    return model, engine_name


def _limit_main(engine_name, model_path, prep, pixels_path, batch_size, cache_dir, out):
    """In a fresh process: images/s of the best of two sustained passes over the decoded pixels."""
    forward, _ = _forward_of(engine_name, model_path, prep, cache_dir)
    pixels = np.load(pixels_path)
    batches = [pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)]
    forward(batches[0])
    seconds, _ = timed(lambda: [forward(b) for b in batches], repeat=2)
    with open(out, "w") as f:
        json.dump({"img_s": len(pixels) / seconds}, f)


def _call(function, args, log):
    out = log + ".json"
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-c", f"import json, sys; sys.path.insert(0, {_REPO!r}); "
                               f"from benchmarks.engine_throughput import {function}; "
                               f"{function}(*json.loads(sys.argv[1]))", json.dumps([*args, out])],
                              stdout=f, stderr=subprocess.STDOUT, cwd=_REPO)
    if done.returncode:
        raise RuntimeError(f"{function} failed; see {log}")
    with open(out) as f:
        return json.load(f)


def startup(shard_glob, model_path, batch, workdir, engine_flags):
    """A fresh worker process (tests/worker.py): interpreter start, unpickle the handler as Beam ships it, load
    (compile) the model, run the first batch. Returns its timings, imports and peak RSS."""
    from weakloc.pipeline import label
    from weakloc.transforms.inference import CamModelHandler, forget_model

    from tests.worker import run_pickled_worker

    config, _ = label.prepare(["--input", shard_glob, "--model", model_path, "--output",
                               os.path.join(workdir, "startup-out"), "--overwrite", "--runner=FnApiRunner",
                               *engine_flags])
    forget_model()
    report = run_pickled_worker(CamModelHandler(config.spec, config.box, batch_size=len(batch)), batch, workdir)
    report.pop("boxes")
    return report


def stage_shares(model_path, prep, encoded, batch_size, cache_dir):
    """Per-image seconds of decode+resize (one thread, as a pool thread does it), the OpenVINO f32 forward and the
    boxes, in-process; and decode images/s with 1 and with cpu_count threads."""
    import concurrent.futures

    from weakloc.models import annotate, images

    size = tuple(prep["input_size"])
    t_dec, decoded = timed(lambda: [images.decode_image(e, size) for e in encoded])
    pixels = np.stack([d.pixels for d in decoded])
    forward, _ = _forward_of("openvino_f32", model_path, prep, cache_dir)
    batches = [pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)]
    forward(batches[0])
    t_fwd, outs = timed(lambda: [forward(b) for b in batches], repeat=2)
    metas = [annotate.ImageMeta(f"i{i}", "s", d.width, d.height) for i, d in enumerate(decoded)]
    names = tuple(prep["class_names"])
    opts = annotate.BoxOptions()

    def boxes():
        i = 0
        for o in outs:
            annotate.annotate_batch(o, metas[i : i + len(o.scores)], names, opts, "m",
                                    np.zeros((len(o.scores), 0), np.int32))
            i += len(o.scores)

    t_box, _ = timed(boxes, repeat=2)
    rates = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            t, _ = timed(lambda: list(pool.map(lambda e: images.decode_image(e, size), encoded)), repeat=2)
        rates[threads] = len(encoded) / t
    draft_off, _ = timed(lambda: [images.decode_image(e, size, draft=False) for e in encoded])
    n = len(encoded)
    per = {"decode_resize": t_dec / n, "forward_openvino_f32": t_fwd / n, "boxes": t_box / n}
    total = sum(per.values())
    return {"ms_per_image": {k: 1000 * v for k, v in per.items()}, "share": {k: v / total for k, v in per.items()},
            "decode_img_s_by_threads": rates, "decode_draft_off_ms_per_image": 1000 * draft_off / n}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--workdir")
    ap.add_argument("--out")
    ap.add_argument("--startup_only", action="store_true", help="measure the fresh workers' start-up and stop")
    ap.add_argument("--startup_reps", type=int, default=1,
                    help="fresh workers per engine, interleaved; the median is printed (the host is shared)")
    args = ap.parse_args(argv)
    d = args.workdir or tempfile.mkdtemp(prefix="weakloc-engines-")
    os.makedirs(d, exist_ok=True)
    cache_dir = os.path.join(d, "cache")
    os.environ["WEAKLOC_CACHE_DIR"] = cache_dir  # every child converts once, into the run's own cache
    n, n_small = args.images, max(args.images // 4, 1)
    model_path = os.path.join(d, "model.keras")
    build_model("mobilenetv2", (224, 224), 1000).save(model_path)
    prep = {"input_size": [224, 224], "scale": 1 / 127.5, "offset": -1.0, "class_names": [f"c{i}" for i in range(1000)]}
    with open(os.path.join(d, "model.json"), "w") as f:
        json.dump(prep, f)
    encoded = make_images(n, (640, 480), "JPEG")
    big, small = write_shards(encoded, os.path.join(d, "shards")), write_shards(encoded[:n_small],
                                                                                 os.path.join(d, "small"))
    from weakloc.models import annotate, images
    from weakloc.transforms.decode import DecodedInput

    decoded = [images.decode_image(e, (224, 224)) for e in encoded[:256]]
    pixels_path = os.path.join(d, "pixels.npy")
    np.save(pixels_path, np.stack([x.pixels for x in decoded]))
    batch = [DecodedInput(annotate.ImageMeta(f"i{i}", "s", x.width, x.height), x.pixels)
             for i, x in enumerate(decoded[: args.batch_size])]
    print("== start-up of a fresh worker (process start to first batch)", flush=True)
    engines_started = (("tensorflow", VARIANTS["tensorflow"]), ("openvino", VARIANTS["openvino_default"]),
                       ("litert", VARIANTS["litert"]))
    reps = {name: [] for name, _ in engines_started}
    for _ in range(max(args.startup_reps, 1)):
        for name, flags in engines_started:
            reps[name].append(startup(big, model_path, batch, d, flags))
            print(f"  {name:10s} " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in reps[name][-1].items()), flush=True)
    # The median worker of each engine, field by field.
    start = {name: {k: (float(np.median([r[k] for r in rows])) if isinstance(v, float) else v)
                    for k, v in rows[0].items()} for name, rows in reps.items()}
    if args.startup_reps > 1:
        for name, row in start.items():
            print(f"  median {name:10s} " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if isinstance(v, float)))
    if args.startup_only:
        return {"startup": start, "startup_reps": reps}
    rounds = []
    for r in range(args.rounds):
        limits = {}
        for name in LIMITS:
            with _env(name):
                limits[name] = _call("_limit_main", [name, model_path, prep, pixels_path, args.batch_size, cache_dir],
                                     os.path.join(d, f"limit-{name}.log"))["img_s"]
        row = {"limits_img_s": limits, "variants": {}, "load_average_before": os.getloadavg()}
        for name, flags in VARIANTS.items():
            with _env(name):
                t_all, summary = run_weakloc(big, model_path, os.path.join(d, f"out-{name}"), args.batch_size,
                                             ["--runner=FnApiRunner", *flags])
                t_few, _ = run_weakloc(small, model_path, os.path.join(d, f"out-{name}-small"), args.batch_size,
                                       ["--runner=FnApiRunner", *flags])
            marginal, fixed = marginal_rate(n, n_small, t_all, t_few)
            steady = (summary.get("throughput") or {}).get("steady_images_per_s")
            row["variants"][name] = {"marginal_img_s": marginal, "steady_img_s": steady, "startup_s": fixed,
                                     "engine": summary["engine"]["name"], "precision": summary["engine"]["precision"]}
        tf = row["variants"]["tensorflow"]
        for name, v in row["variants"].items():
            limit = limits[OWN_LIMIT[name]]
            v["steady_vs_own_limit"] = v["steady_img_s"] / limit
            v["marginal_vs_own_limit"] = v["marginal_img_s"] / limit
            v["steady_vs_tensorflow"] = v["steady_img_s"] / tf["steady_img_s"]
            v["marginal_vs_tensorflow"] = v["marginal_img_s"] / tf["marginal_img_s"]
        row["limit_ratios"] = {k: v / limits["tensorflow"] for k, v in limits.items()}
        row["load_average_after"] = os.getloadavg()
        rounds.append(row)
        print(f"== round {r + 1} (load average {row['load_average_before'][0]:.1f} -> "
              f"{row['load_average_after'][0]:.1f}): limits " + ", ".join(f"{k} {v:.1f}" for k, v in limits.items()), flush=True)
        for name, v in row["variants"].items():
            print(f"  {name:18s} " + ", ".join(f"{k} {x:.3f}" if isinstance(x, float) else f"{k} {x}"
                                             for k, x in v.items()), flush=True)
    median = {name: {key: float(np.median([r["variants"][name][key] for r in rounds]))
                     for key in ("steady_vs_tensorflow", "marginal_vs_tensorflow", "steady_vs_own_limit",
                                 "marginal_vs_own_limit", "steady_img_s", "marginal_img_s")} for name in VARIANTS}
    limit_ratio = {k: float(np.median([r["limit_ratios"][k] for r in rounds])) for k in LIMITS}
    print("== medians over rounds", flush=True)
    for name, v in median.items():
        print(f"  {name:18s} " + ", ".join(f"{k} {x:.3f}" for k, x in v.items()))
    print("  limits vs TensorFlow's: " + ", ".join(f"{k} {v:.2f}" for k, v in limit_ratio.items()))
    print("== stage shares with OpenVINO f32 (in-process, one thread decoding)", flush=True)
    stages = stage_shares(model_path, prep, encoded[:256], args.batch_size, cache_dir)
    print("  " + json.dumps(stages))
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu_model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                     "unknown")
    doc = {"images": n, "batch_size": args.batch_size, "startup": start, "rounds": rounds, "median": median,
           "limit_ratio_median": limit_ratio, "stages": stages, "cpus": os.cpu_count(),
           "cpu_flags": sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma"))),
           "cpu_model": cpu_model, "load_average_end": os.getloadavg(),
           "peak_rss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    print(f"  cpu: {cpu_model}; flags: {' '.join(doc['cpu_flags'])}; load average at the end "
          f"{doc['load_average_end'][0]:.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
    return doc


if __name__ == "__main__":
    main()
