"""Co-localization (DDT) in Beam: one forward pass keeps each image's feature map; a CombineFn pools per-class
descriptor statistics over the whole input; each image's map is then its features projected on its class's
first principal component, boxed like a CAM. The maths is models/coloc.py; this module adapts it.

Why one forward pass and not two: the feature map a projection needs (7 x 7 x 1280 for MobileNetV2, kept as
float16: 125 kB) is smaller than the decoded picture (224 x 224 x 3: 150 kB) and far cheaper than a second
forward pass, so the features wait for the statistics instead of being recomputed. With statistics from an
earlier run (`--coloc_stats`), nothing waits: the side input is ready at once and the job is one pass.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import RunInference

from weakloc.models import annotate, coloc, schema
from weakloc.models.cam import CamOutputs

from weakloc.models.opening import ModelSpec

from .inference import CamModelHandler
from .tags import FAILURES, NAMESPACE

logger = logging.getLogger(__name__)

_NO_COMPONENT = Metrics.counter(NAMESPACE, "coloc_maps_without_component")
_COMPONENT_FAILED = Metrics.counter(NAMESPACE, "coloc_classes_without_component")


@dataclasses.dataclass
class Inferred:
    """One image after the forward pass, waiting for its class's component.

    top_classes, top_scores (k,); cam_classes (M,) and low_res (M, h, w): the top-k classes' CAMs then those
    of the image's own labels (`extra`, unpadded); scores (C,); features float16 (h, w, K); boxed: the classes
    that will get boxes (the keys its descriptors count for).
    """

    meta: annotate.ImageMeta
    scores: np.ndarray
    top_classes: np.ndarray
    top_scores: np.ndarray
    cam_classes: np.ndarray
    low_res: np.ndarray
    extra: np.ndarray
    features: np.ndarray
    boxed: list


class FeatureHandler(CamModelHandler):
    """The CAM handler with the feature map kept: each image comes out as an `Inferred`, not a row."""

    def run_inference(self, batch: Sequence[Any], model, inference_args=None) -> Iterable[Inferred]:
        metas = [item.meta for item in batch]
        extra = annotate.extra_classes(metas, self.opts)
        out = model(np.stack([item.pixels for item in batch]), extra)
        k = out.top_classes.shape[1]
        boxed: list[list[int]] = [[] for _ in metas]
        for b, _, c in annotate.pick_maps(out, extra, self.opts):
            boxed[b].append(c)
        feats = out.features.astype(np.float16)
        result = []
        for b, meta in enumerate(metas):
            keep = k + int((extra[b] >= 0).sum())  # extra_classes pads with -1 at the end only
            result.append(Inferred(meta, out.scores[b], out.top_classes[b], out.top_scores[b],
                                   out.cam_classes[b, :keep], out.low_res[b, :keep], extra[b, extra[b] >= 0],
                                   feats[b], boxed[b]))
        self._done.update(int(1000 * (time.time() - self.built)))
        return result


class ColocCombineFn(beam.CombineFn):
    """(feature map float (h, w, K), the class's CAM (h', w')) of one class -> their `coloc.ClassStats`,
    mergeable in any grouping."""

    def create_accumulator(self):
        return None  # K is known from the first input

    def add_input(self, acc, features_and_map):
        stats = coloc.ClassStats.of(*features_and_map)
        return stats if acc is None else acc.add(stats)

    def merge_accumulators(self, accs):
        out = None
        for acc in accs:
            if acc is not None:
                out = acc if out is None else out.add(acc)
        return out

    def extract_output(self, acc):
        return acc


def _descriptor_keys(it: Inferred):
    """(class id, (features, that class's CAM)) for each class the image is boxed for, once each."""
    for c in dict.fromkeys(it.boxed):
        col = int(np.flatnonzero(it.cam_classes == c)[0])  # pick_maps boxes columns of cam_classes
        yield c, (it.features, it.low_res[col])


def _with_component(kv):
    """(class id, stats) -> [(class id, stats, component)], or nothing (counted, logged) when the class's
    descriptors have no principal component."""
    c, stats = kv
    try:
        yield c, stats, coloc.principal_component(stats)
    except coloc.ColocError as exc:
        _COMPONENT_FAILED.inc()
        logger.warning("class %d: no co-localization component (%s); its maps stay CAMs", c, exc)


def batch_outputs(items: Sequence[Inferred], size) -> tuple[CamOutputs, np.ndarray]:
    """Stack images of different batches into one CamOutputs (features included) and its -1 padded extra."""
    width = max(len(it.cam_classes) for it in items)
    k = len(items[0].top_classes)
    n, (h, w) = len(items), items[0].low_res.shape[1:]
    classes = np.zeros((n, width), np.int32)
    low = np.zeros((n, width, h, w), np.float32)
    extra = np.full((n, width - k), -1, np.int32)
    for i, it in enumerate(items):
        m = len(it.cam_classes)
        classes[i, :m], low[i, :m] = it.cam_classes, it.low_res
        extra[i, : len(it.extra)] = it.extra
    out = CamOutputs(np.stack([it.scores for it in items]), np.stack([it.top_classes for it in items]),
                     np.stack([it.top_scores for it in items]), classes, low, tuple(size),
                     np.stack([it.features for it in items]))
    return out, extra


class ColocBoxesDoFn(beam.DoFn):
    """Batches of `Inferred` + the components side input -> annotation rows (failure rows for a batch that
    cannot be boxed)."""

    def __init__(self, spec: ModelSpec, opts: annotate.BoxOptions, cfg: coloc.ColocConfig):
        self.spec, self.opts, self.cfg = spec, opts, cfg

    def process(self, items, components):
        try:
            out, extra = batch_outputs(items, self.spec.input_size)
            out, missing = coloc.colocalized(out, components, self.cfg.maps, self.cfg.fuse)
            rows = annotate.annotate_batch(out, [it.meta for it in items], self.spec.class_names, self.opts,
                                           self.spec.name, extra)
        except Exception as exc:  # one bad batch must not sink the job: its images become failure rows
            logger.exception("co-localization boxes failed for a batch of %d images", len(items))
            for it in items:
                yield beam.pvalue.TaggedOutput(FAILURES, schema.failure_row(it.meta.source, "coloc", exc,
                                                                            image_id=it.meta.image_id))
            return
        if missing:
            _NO_COMPONENT.inc(missing)
        yield from rows


class Colocalize(beam.PTransform):
    """DecodedInput -> (annotation rows, RunInference dead letters, failure rows), with co-localization maps.

    Without components in the config, the statistics are combined over this input (keyed by the classes each
    image is boxed for), written to `<output>/coloc_stats.npz` + `coloc_stats.json`, and handed to the boxing
    step as a side input; with them (`--coloc_stats`), that step starts at once.
    """

    def __init__(self, spec: ModelSpec, opts: annotate.BoxOptions, cfg: coloc.ColocConfig, *, batch_size: int,
                 output: str):
        super().__init__()
        self.spec, self.opts, self.cfg, self.batch_size, self.output = spec, opts, cfg, batch_size, output

    def expand(self, images):
        handler = FeatureHandler(self.spec, self.opts, batch_size=self.batch_size)
        inferred, dead = images | "FeatureInference" >> RunInference(handler).with_exception_handling()
        if self.cfg.components is not None:
            comps = images.pipeline | "ReusedComponents" >> beam.Create(sorted(self.cfg.components.items()))
        else:
            combined = (
                inferred
                | "DescriptorKeys" >> beam.FlatMap(_descriptor_keys)
                | "CombineStats" >> beam.CombinePerKey(ColocCombineFn())
                | "Components" >> beam.FlatMap(_with_component)
            )
            _ = (combined | "AllStats" >> beam.combiners.ToList()
                 | "WriteStats" >> beam.Map(_write, self.output, self.spec.class_names, self.cfg.extractor))
            comps = combined | "ComponentOnly" >> beam.Map(lambda t: (t[0], t[2]))
        boxed = (
            inferred
            | "Rebatch" >> beam.BatchElements(min_batch_size=self.batch_size, max_batch_size=self.batch_size)
            | "ColocBoxes" >> beam.ParDo(ColocBoxesDoFn(self.spec, self.opts, self.cfg), beam.pvalue.AsDict(comps))
            .with_outputs(FAILURES, main="rows")
        )
        return boxed.rows, dead.failed_inferences, boxed[FAILURES]


def _write(triples, output, class_names, extractor):
    if not triples:
        logger.warning("no class had enough descriptors for co-localization statistics: none written")
        return None
    return coloc.write_stats(output, sorted(triples, key=lambda t: t[0]), class_names, extractor)
