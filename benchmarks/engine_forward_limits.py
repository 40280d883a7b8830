"""Forward-pass limits (issue 14) of the fused CAM graph of MobileNetV2-224 (random weights) in one process,
interleaved rounds: OpenVINO under PERFORMANCE_HINT LATENCY and THROUGHPUT (sync, and an AsyncInferQueue of the
optimal number of requests over sub-batches), LiteRT with and without sub-batches, and TensorFlow.

    python benchmarks/engine_forward_limits.py [ROUNDS] [WORKDIR]

Forward limits only, on decoded uint8 batches in memory: a setting that wins here still has to win end to end
(benchmarks/engine_throughput.py) before it becomes a default. Ratios only: the host is shared. Not a test.
"""

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
from tests.benchmarks.throughput import build_model
from weakloc.models import opening, engines
from weakloc.models.engines import cache
from weakloc.pipeline.engine import method_options
import json as _j  # noqa: E402

d = sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp(prefix="weakloc-limits-")
os.makedirs(d, exist_ok=True)
mp = os.path.join(d, "model.keras")
if not os.path.exists(mp):
    build_model("mobilenetv2", (224, 224), 1000).save(mp)
    _j.dump(
        {"input_size": [224, 224], "scale": 1 / 127.5, "offset": -1.0, "class_names": [f"c{i}" for i in range(1000)]},
        open(os.path.join(d, "model.json"), "w"),
    )
op = opening.open_model(mp)
method = op.build(top_k=1)
spec = op.spec
paths = {}
for name in ("openvino", "litert"):
    e = engines.get(name)
    t = time.perf_counter()
    paths[name], hit = cache.cached_convert(
        e,
        cache.cache_key(e, cache.model_digest(spec), method_options(spec, 1)),
        method,
        directory=os.path.join(d, "cache"),
    )
    print(
        name,
        "convert",
        round(time.perf_counter() - t, 1),
        "s hit",
        hit,
        os.path.getsize(paths[name]) // 1e6,
        "MB",
        flush=True,
    )
rng = np.random.default_rng(0)
pix = rng.integers(0, 256, (256, 224, 224, 3), dtype=np.uint8)
ov = engines.get("openvino")
core = ov.core()
import openvino as ovm  # noqa: E402
import tarfile  # noqa: E402

tar = tarfile.open(paths["openvino"])
xml = tar.extractfile("model.xml").read()
wts = tar.extractfile("model.bin").read()


def ov_compile(cfg):
    m = core.read_model(model=xml, weights=ovm.Tensor(np.frombuffer(wts, np.uint8)))
    return core.compile_model(m, "CPU", cfg)


def sync_fwd(c):
    r = c.create_infer_request()
    return lambda b: r.infer([b, np.zeros((len(b), 0), np.int32)])


def async_fwd(c, n):
    q = ovm.AsyncInferQueue(c, n)

    def f(b):
        parts = np.array_split(b, n)
        for p in parts:
            q.start_async([p, np.zeros((len(p), 0), np.int32)])
        q.wait_all()

    return f


variants = {}
lat = ov_compile({"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
thr = ov_compile({"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "f32"})
nreq = thr.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
print(
    "THROUGHPUT optimal requests",
    nreq,
    "streams",
    thr.get_property("NUM_STREAMS"),
    "LATENCY threads",
    lat.get_property("INFERENCE_NUM_THREADS"),
    flush=True,
)


def chunked(f, c):
    def g(b):
        for i in range(0, len(b), c):
            f(b[i : i + c])

    return g


def async_chunks(c, n, size):
    q = ovm.AsyncInferQueue(c, n)

    def f(b):
        for i in range(0, len(b), size):
            p = b[i : i + size]
            q.start_async([p, np.zeros((len(p), 0), np.int32)])
        q.wait_all()

    return f


variants["ov_latency_b32"] = (sync_fwd(lat), 32)
variants["ov_latency_b32_chunk8"] = (chunked(sync_fwd(lat), 8), 32)
variants["ov_latency_b32_chunk4"] = (chunked(sync_fwd(lat), 4), 32)
variants["ov_latency_b32_chunk16"] = (chunked(sync_fwd(lat), 16), 32)
variants["ov_throughput_async_b32"] = (async_fwd(thr, nreq), 32)
variants["ov_throughput_async_b32_chunk8"] = (async_chunks(thr, nreq, 8), 32)
variants["ov_throughput_async_b32_chunk4"] = (async_chunks(thr, nreq, 4), 32)
lt = engines.get("litert").load(open(paths["litert"], "rb").read(), "f32")
ltf = lambda b: lt(b, np.zeros((len(b), 0), np.int32))
variants["litert_b32"] = (ltf, 32)
variants["litert_b32_chunk8"] = (chunked(ltf, 8), 32)
variants["litert_b32_chunk4"] = (chunked(ltf, 4), 32)
variants["tensorflow_b32"] = (lambda b: method(b), 32)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
res = {k: [] for k in variants}
for r in range(rounds):
    for k, (f, bs) in variants.items():
        bs_ = [pix[i : i + bs] for i in range(0, 128, bs)]
        f(bs_[0])
        t = time.perf_counter()
        for b in bs_:
            f(b)
        res[k].append(128 / (time.perf_counter() - t))
    print("round", r + 1, "load", os.getloadavg()[0], {k: round(v[-1], 1) for k, v in res.items()}, flush=True)
tf = np.median(res["tensorflow_b32"])
for k, v in res.items():
    print(f"{k:28s} median {np.median(v):7.1f} img/s  x TF {np.median(v) / tf:.2f}  rounds {[round(x, 1) for x in v]}")
json.dump(res, open(os.path.join(d, "limits.json"), "w"))
print("figures in", os.path.join(d, "limits.json"))
