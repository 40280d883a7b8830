"""Choosing the method by cross-validation (models/choose.py, `weakloc calibrate`): synthetic maps whose best
method is known by construction, label following the file calibrate wrote, and plain CAM without boxed images."""
import dataclasses
import json

import numpy as np
import pytest

from weakloc.models import boxes as boxlib
from weakloc.models import choose, defaults, graph, metrics, opening, records, synthetic
from weakloc.models.graph import find_gap_head
from weakloc.pipeline import calibrate, cli, inputs, label, results

from tests.helpers import RUNNER, png_bytes
from tests.test_refine import blurred_rectangles


def sharp_rectangles(n, seed):
    """Maps that are exactly their object: a filled rectangle on zeros (test_refine's rectangles, unblurred). Any
    threshold above 0 boxes the rectangle exactly, so plain CAM is already perfect and nothing can beat it."""
    normed, valid, truths = blurred_rectangles(n, seed, sigma=0.0)
    return choose.Maps(normed, valid, truths, np.arange(n) % 3)


def split_objects(n, seed, size=64):
    """Each object shows as two separate blobs at its two ends (a map that fires on the parts of an object):
    the true box encloses both, so the union of the components is right and the largest component is not."""
    rng = np.random.default_rng(seed)
    maps, truths = [], []
    for _ in range(n):
        w, h = rng.integers(30, 50), rng.integers(8, 16)
        x0, y0 = rng.integers(2, size - 2 - w), rng.integers(2, size - 2 - h)
        m = np.zeros((size, size), np.float32)
        part = w // 3
        m[y0 : y0 + h, x0 : x0 + part] = 1.0
        m[y0 : y0 + h, x0 + w - part : x0 + w] = 0.9
        maps.append(m)
        truths.append(np.array([[x0, y0, x0 + w, y0 + h]], np.float32))
    normed, valid = boxlib.normalize_cams(np.stack(maps))
    return choose.Maps(normed, valid, truths, np.arange(n) % 2)


def test_iou_table_sweeps_exactly_as_the_threshold_sweep():
    maps = sharp_rectangles(12, seed=0)
    table = metrics.iou_table(maps.normed, maps.truths, valid=maps.valid)
    assert table.shape == (100, 12)
    # At tau 0 every pixel is in and the box is the whole map; above it, every box is its rectangle.
    np.testing.assert_allclose(table[1:], 1.0, atol=1e-6)
    expected = [(t[0, 2] - t[0, 0]) * (t[0, 3] - t[0, 1]) / 64**2 for t in maps.truths]
    np.testing.assert_allclose(table[0], expected, rtol=1e-5)
    sweep = metrics.sweep_thresholds(maps.normed, maps.truths, valid=maps.valid)
    np.testing.assert_array_equal(sweep.accuracy, metrics.sweep_of(table, metrics.DEFAULT_TAUS).accuracy)


def test_refinement_wins_where_maps_blur_their_objects():
    normed, valid, truths = blurred_rectangles(100, seed=0)
    maps = choose.Maps(normed, valid, truths, np.arange(100) % 4)
    choice = choose.choose({choose.PLAIN: maps})
    scores = {s.candidate.name: s for s in choice.scores}
    assert set(scores) == {c.name for c in choose.CANDIDATES if c.maps == choose.PLAIN and c.post != "regress"}  # maps it was given (no regression pool)
    assert choice.winner.candidate.name == "cam_refine" and choice.winner.refiner is not None
    assert scores["cam_refine"].mean > scores["cam"].mean + 0.05
    # What was chosen generalises: on new maps of the same blur the refitted winner beats plain CAM's fit.
    t_normed, t_valid, t_truths = blurred_rectangles(150, seed=1)
    classes = np.arange(150) % 4
    refined, has = choice.winner.boxes(t_normed, t_valid, classes)
    plain = choose.fit(choose.DEFAULT, maps, metrics.iou_table(normed, truths, valid=valid), metrics.DEFAULT_TAUS)
    base, _ = plain.boxes(t_normed, t_valid, classes)
    assert has.all()
    assert (metrics.best_iou(refined, t_truths) >= 0.7).mean() > (metrics.best_iou(base, t_truths) >= 0.7).mean() + 0.1


def test_plain_cam_stays_when_nothing_can_beat_it():
    maps = sharp_rectangles(40, seed=2)
    choice = choose.choose({choose.PLAIN: maps})
    assert choice.winner.candidate == choose.DEFAULT  # ties go to the first (simplest) row of the table
    np.testing.assert_allclose(choice.best.accuracy, 1.0)
    assert choice.winner.default == 0.01  # the first threshold that boxes every rectangle (first on ties)


def test_union_wins_for_objects_split_in_two():
    choice = choose.choose({choose.PLAIN: split_objects(30, seed=3)}, min_per_class=100)
    assert choice.winner.candidate.boxes == "union"
    scores = {s.candidate.name: s for s in choice.scores}
    assert scores["cam_union"].accuracy[2] == 1.0 and scores["cam"].accuracy[1] == 0.0


def test_the_map_kind_that_shows_the_object_wins():
    """Contrast maps that are the rectangles against plain maps where a shared distractor outshines them."""
    good = sharp_rectangles(30, seed=4)
    distracted = good.normed * 0.5
    distracted[:, 40:60, 2:40] = 1.0  # the same bright patch on every plain map
    plain = choose.Maps(*boxlib.normalize_cams(distracted), good.truths, good.classes)
    choice = choose.choose({choose.PLAIN: plain, choose.CONTRAST: good})
    assert choice.winner.candidate.maps == choose.CONTRAST and choice.winner.candidate.post == "none"
    assert choice.winner.thresholds(["a", "b", "c"]).cam_contrast is True


def distracted_features(n, seed, size=16, k=4):
    """Hand-made feature maps (n, size, size, k) where co-localization is right and CAM is not: each image's
    object is a random rectangle (4-6 cells a side, left half) of strong channel-0 descriptors, the variance the
    class's images share most; a larger, weaker 7 x 7 patch of channel 1 sits in the right half. The class weights
    favour channel 1 (the patch's CAM 1.5 over the object's 0.9), so the CAM's largest component is the patch at
    every threshold; the pool's first principal component is mostly channel 0 (and against channel 1: the two never
    overlap), so the projection is the object; w . v > 0 still signs it positive."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(0.0, 0.05, (n, size, size, k)).astype(np.float32)
    truths = []
    for i in range(n):
        w, h = rng.integers(4, 7, size=2)
        x0, y0 = rng.integers(0, size // 2 - w + 1), rng.integers(0, size - h + 1)
        feats[i, y0 : y0 + h, x0 : x0 + w, 0] += 3.0
        truths.append(np.array([[x0, y0, x0 + w, y0 + h]], np.float32))
        px, py = rng.integers(size // 2 + 1, size - 7 + 1), rng.integers(0, size - 7 + 1)
        feats[i, py : py + 7, px : px + 7, 1] += 1.5
    kernel = np.zeros((k, 1), np.float32)
    kernel[0, 0], kernel[1, 0] = 0.3, 1.0
    return feats, truths, kernel


def test_calibrate_picks_colocalization_where_cams_box_a_distractor():
    from weakloc.models import cam, coloc

    n = 40
    feats, truths, kernel = distracted_features(n, seed=6)
    cams = np.einsum("nhwk,k->nhw", feats, kernel[:, 0])[:, None]
    classes = np.zeros(n, int)
    # The statistics and maps as calibrate makes them: pooled per class, projected by coloc.colocalized.
    pool = coloc.pooled_components(feats, [[0]] * n, cams)
    assert [c for c, _, _ in pool] == [0] and pool[0][2].direction[0] > 0.95  # signed by the CAM: object +
    out = cam.CamOutputs(np.ones((n, 1), np.float32), np.zeros((n, 1), np.int32), np.ones((n, 1), np.float32),
                         np.zeros((n, 1), np.int32), cams, (16, 16), feats)
    colocs = coloc.colocalized(out, {0: pool[0][2]}, "coloc")[0].low_res[:, 0]
    plain = choose.Maps(*boxlib.normalize_cams(cams[:, 0]), truths, classes)
    colocated = choose.Maps(*boxlib.normalize_cams(colocs), truths, classes)
    choice = choose.choose({choose.PLAIN: plain, choose.COLOC: colocated},
                           [c for c in choose.CANDIDATES if c.maps in (choose.PLAIN, choose.COLOC)])
    scores = {s.candidate.name: s for s in choice.scores}
    assert choice.winner.candidate.maps == choose.COLOC
    assert scores["coloc"].accuracy[1] >= 0.9 and scores["cam"].accuracy[1] <= 0.2
    doc = choice.winner.thresholds(["thing"], coloc_stats="t.coloc").to_json()
    assert doc["method"]["coloc"] == "coloc" and doc["method"]["coloc_stats"] == "t.coloc"


def distracted_with_features(n, seed, size=32):
    """Maps of objects in the left half; every other map also fires, harder and wider, on a distractor in the
    right half, so its largest component is the distractor at any threshold. Those maps' class scores are low
    (0.3 against 0.9). Each image's features (1 x 1 x 6) are its true box, normalised, and two noise channels:
    a regressor self-trained on the confident (clean) maps' pseudo-boxes can box the distracted ones too."""
    rng = np.random.default_rng(seed)
    maps, truths, feats, top = [], [], [], []
    for i in range(n):
        w, h = rng.integers(5, 9), rng.integers(5, 9)
        x0, y0 = rng.integers(1, 15 - w), rng.integers(1, size - 1 - h)
        m = np.zeros((size, size), np.float32)
        m[y0 : y0 + h, x0 : x0 + w] = 0.9
        if i % 2:
            m[2:30, 17:31] = 1.0
        maps.append(m)
        truths.append(np.array([[x0, y0, x0 + w, y0 + h]], np.float32))
        feats.append(np.concatenate([[x0, y0, x0 + w, y0 + h] / np.float32(size), rng.normal(size=2)]))
        top.append(0.3 if i % 2 else 0.9)
    normed, valid = boxlib.normalize_cams(np.stack(maps))
    feats = np.stack(feats).astype(np.float32).reshape(n, 1, 1, 6)
    return normed, valid, truths, feats, np.array(top, np.float32)


def test_calibrate_picks_the_regressor_where_confident_maps_teach_the_doubtful_ones():
    from weakloc.models import regressor

    normed, valid, truths, feats, top = distracted_with_features(60, seed=0)
    desc = regressor.descriptors(feats)
    maps = choose.Maps(normed, valid, truths, np.zeros(60, np.int64), desc)
    # The images to label: 100 more of the same kind; no true box of theirs is read.
    p_normed, p_valid, _, p_feats, p_top = distracted_with_features(100, seed=1)
    pool = choose.RegressPool(np.concatenate([normed, p_normed]), np.concatenate([valid, p_valid]),
                              np.concatenate([top, p_top]), np.concatenate([desc, regressor.descriptors(p_feats)]))
    choice = choose.choose({choose.PLAIN: maps}, [choose.candidate(n) for n in ("cam", "cam_global", "cam_refine",
                                                                                "regress", "cam+regress")],
                           pool=pool)
    scores = {s.candidate.name: s for s in choice.scores}
    # Half the maps box their distractor (IoU 0) whatever the threshold: plain CAM is right on at most half.
    assert scores["cam"].accuracy[1] <= 0.5 + 1e-6
    assert scores["regress"].accuracy[1] >= 0.95
    # Blending with the map's own box keeps the distractor's pull: below the regressed box alone.
    assert scores["cam+regress"].mean < scores["regress"].mean
    assert choice.winner.candidate.name == "regress" and choice.winner.regressor is not None
    # The regressor was self-trained on confident (clean) pseudo-boxes only: at most the clean half of the pool.
    assert 8 <= choice.winner.regressor.samples <= 80
    doc = choice.winner.thresholds(["thing"], regressor_file="t.regress.npz").to_json()
    assert doc["method"]["regressor"] == "t.regress.npz" and doc["method"]["regress_blend"] == 1.0


def test_method_round_trip_and_refusals():
    from weakloc.models.thresholds import Method, ThresholdsError

    m = Method(name="fused_product", coloc="product", coloc_stats="x.coloc")
    assert Method.from_json(json.loads(json.dumps(m.to_json()))) == m
    assert "coloc" not in Method().to_json()  # CAM methods' files read as before
    with pytest.raises(ThresholdsError, match="method.coloc in t must be one of"):
        Method.from_json({"coloc": "ddt"}, where="t")
    with pytest.raises(ThresholdsError, match="coloc_stats in t must name the folder"):
        Method.from_json({"coloc": "coloc"}, where="t")


def test_folds_spread_every_class_and_a_refinement_too_few_to_fit_is_skipped_with_its_reason():
    fold = choose.folds_of(np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1]), k=3)
    assert fold.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    normed, valid, truths = blurred_rectangles(15, seed=5)
    choice = choose.choose({choose.PLAIN: choose.Maps(normed, valid, truths, np.zeros(15, int))})
    skipped = {s.candidate.name: s.reason for s in choice.scores if s.accuracy is None}
    assert "cam_refine" in skipped and "at least 20" in skipped["cam_refine"]
    assert choice.winner.refiner is None


# --- through the commands: calibrate writes the winner, label follows it ---------------------------------------

@pytest.fixture(scope="module")
def boxed_shard(tmp_path_factory):
    """30 synthetic shapes (40x40) with image labels and true boxes, in one TFRecord shard."""
    data = synthetic.make_shapes(30, size=40, seed=3)
    shard = tmp_path_factory.mktemp("boxed") / "boxed.tfrecord"
    shard.write_bytes(b"".join(records.frame_record(records.make_example(
        png_bytes(data.images[i]), source_id=f"b{i}", labels=[int(data.labels[i]) % 3],
        boxes=[list(np.asarray(data.boxes[i]) / 40)], box_labels=[int(data.labels[i]) % 3])) for i in range(30)))
    return str(shard)


def calibrate_maps(model_path, shard, kind, regress=False):
    opened = opening.open_model(model_path, contrast=kind.contrast, flip_tta=kind.flip_tta,
                                method="coloc" if kind.coloc != "none" or regress else "cam")
    spec = opened.spec
    if kind.coloc_layer == "auto":  # what calibrate resolves it to (tiny_gap_model: c1, twice the head's grid)
        spec = dataclasses.replace(spec, coloc_layer=graph.finer_layer(opened.keras_model, find_gap_head(
            opened.keras_model)))
        assert spec.coloc_layer == "c1"
    model, prep = spec.build(opened.keras_model, top_k=1), spec.prep
    examples = list(inputs.iterate(inputs.scan([shard], class_names=prep.class_names), input_size=prep.input_size))
    transform = None
    if kind.coloc != "none":
        pool = calibrate.coloc_pool(model, examples)
        transform = calibrate.coloc_transform(pool, kind)
    normed, valid, truths, classes, _, _ = calibrate.class_maps(model, iter(examples), transform=transform)
    maps, pool = choose.Maps(normed, valid, truths, classes), None
    if regress:
        pool, desc = calibrate.regress_pool(model, examples)
        maps = choose.Maps(normed, valid, truths, classes, desc)
    return examples, prep, maps, pool, spec.coloc_layer


@pytest.mark.parametrize("name", ["cam", "contrast_global", "flip", "cam_union", "cam_stretch",
                                  "contrast_flip_refine", "coloc", "fused_product", "coloc_fine", "fused_fine_mean",
                                  "regress", "cam+regress"])
def test_label_with_the_file_naming_a_method_gives_the_boxes_calibrate_scored(name, tiny_model_path, boxed_shard,
                                                                              tmp_path, capsys):
    thr = tmp_path / "thr.json"
    doc = calibrate.run(["--input", boxed_shard, "--model", tiny_model_path, "--output", str(thr),
                         "--candidates", name, "--min_per_class", "5"])
    assert "<- chosen" in calibrate.render(doc)
    assert doc["method"]["name"] == name and json.loads(thr.read_text()) == json.loads(json.dumps(
        {k: v for k, v in doc.items() if k != calibrate.REPORT}))
    cand = choose.candidate(name)
    # calibrate's own fit, redone here on the same maps: what label must reproduce.
    regress = cand.post == "regress"
    examples, prep, maps, pool, layer = calibrate_maps(tiny_model_path, boxed_shard, cand.maps, regress)
    table = metrics.iou_table(maps.normed, maps.truths, valid=maps.valid, mode=cand.boxes, min_area=0.01)
    fitted = choose.fit(cand, maps, table, metrics.DEFAULT_TAUS, min_per_class=5,
                        shrink=defaults.THRESHOLD_SHRINK, pool=pool)  # calibrate's default --shrink
    stats = "thr.coloc" if cand.maps.coloc != "none" else None  # calibrate's statistics, beside the file
    reg_file = "thr.regress.npz" if regress else None  # and its regressor
    assert fitted.thresholds(prep.class_names, coloc_stats=stats, regressor_file=reg_file,
                             coloc_layer=layer).to_json().items() <= doc.items()
    expected, has = fitted.boxes(maps.normed, maps.valid, maps.classes, maps.desc)
    if regress:  # the regressed boxes are not the plain ones: the test below reads the regressor's
        plain, _ = dataclasses.replace(fitted, regressor=None).boxes(maps.normed, maps.valid, maps.classes)
        assert np.abs(plain[has] - expected[has]).max() > 0.5
    out = tmp_path / "labels"
    summary = label.run(["--input", boxed_shard, "--model", tiny_model_path, "--output", str(out),
                         "--thresholds", str(thr), "--classes", "labels", f"--runner={RUNNER}"])
    opts = summary["options"]
    assert (opts["flip_tta"], opts["cam_contrast"], opts["boxes"]) == (cand.maps.flip_tta, cand.maps.contrast,
                                                                       cand.boxes)
    assert opts["box_regressor"] == regress
    if cand.maps.coloc != "none":  # label reused the statistics calibrate wrote beside the file: one pass
        assert opts["method"] == ("coloc" if cand.maps.coloc == "coloc" else "fused")
        assert opts["coloc_stats"] == str(tmp_path / "thr.coloc")
        assert opts["coloc_layer"] == layer and doc["method"]["coloc_layer"] == layer
    rows = {r["image_id"]: r for r in results.read_table(str(out)).to_pylist()}
    assert has.sum() >= 20
    for i, ex in enumerate(examples):
        got = [b for b in rows[ex.image_id]["boxes"] if b["class_id"] == maps.classes[i]]
        assert len(got) == int(has[i])
        if has[i]:
            want = boxlib.scale_boxes(expected[i], prep.input_size, (ex.height, ex.width))[0]
            np.testing.assert_allclose([got[0][k] for k in ("xmin", "ymin", "xmax", "ymax")], want, atol=1e-4)


@pytest.mark.parametrize("names", ["fused_mean", "cam,coloc_fine"])
def test_instance_boxes_on_the_candidates_maps_are_the_ones_label_gives(names, tiny_model_path, boxed_shard,
                                                                        tmp_path):
    """calibrate --boxes instances --candidates: the instance rule fitted on each row's maps, the best instance
    F1 kept; label follows the file (co-localization statistics included) and gives exactly `boxes_from_cams` of
    the winning maps with the written threshold and rule."""
    from weakloc.models import detection

    thr = tmp_path / "thr.json"
    doc = calibrate.run(["--input", boxed_shard, "--model", tiny_model_path, "--output", str(thr),
                         "--boxes", "instances", "--candidates", names, "--min_per_class", "100"])
    tried = doc["calibration"]["maps_tried"]
    assert list(tried) == names.split(",")
    # Each row's F1 is what the instance calibration gives on its maps, redone here; the first best wins.
    for name, f1 in tried.items():
        _, _, maps, _, _ = calibrate_maps(tiny_model_path, boxed_shard, choose.candidate(name).maps)
        assert detection.calibrate_instances(maps.normed, maps.truths, maps.classes, valid=maps.valid,
                                             min_per_class=100).overall.max_box_acc_v2 == pytest.approx(f1)
    winner = max(tried, key=tried.get)
    assert doc["calibration"]["maps"] == winner and doc["method"]["boxes"] == "instances"
    kind = choose.candidate(winner).maps
    assert doc["method"]["coloc"] == kind.coloc and (doc["method"]["coloc_stats"] is not None) == (kind.coloc != "none")
    examples, prep, maps, _, layer = calibrate_maps(tiny_model_path, boxed_shard, kind)
    assert doc["method"]["coloc_layer"] == (layer if kind.coloc != "none" else None)
    rule = boxlib.InstanceRule.from_json(doc["instances"])
    want = boxlib.boxes_from_cams(maps.normed, doc["default"], valid=maps.valid, mode="instances", instances=rule)
    assert len(want.map_index) >= 20
    out = tmp_path / "labels"
    summary = label.run(["--input", boxed_shard, "--model", tiny_model_path, "--output", str(out),
                         "--thresholds", str(thr), "--classes", "labels", f"--runner={RUNNER}"])
    assert summary["options"]["boxes"] == "instances"
    rows = {r["image_id"]: r for r in results.read_table(str(out)).to_pylist()}
    for i, ex in enumerate(examples):
        mine = want.map_index == i
        got = [b for b in rows[ex.image_id]["boxes"] if b["class_id"] == maps.classes[i]]
        assert len(got) == mine.sum()
        xyxy = boxlib.scale_boxes(want.xyxy[mine], prep.input_size, (ex.height, ex.width))
        np.testing.assert_allclose([[b[k] for k in ("xmin", "ymin", "xmax", "ymax")] for b in got], xyxy, atol=1e-4)


def test_instance_candidates_refuse_the_map_flags(tiny_model_path, boxed_shard, tmp_path):
    with pytest.raises(calibrate.OptionsError, match="drop --cam_contrast and --flip_tta"):
        calibrate.run(["--input", boxed_shard, "--model", tiny_model_path, "--output", str(tmp_path / "t.json"),
                       "--boxes", "instances", "--candidates", "cam", "--flip_tta"])
    with pytest.raises(calibrate.OptionsError, match="no candidate 'nope'"):
        calibrate.run(["--input", boxed_shard, "--model", tiny_model_path, "--output", str(tmp_path / "t.json"),
                       "--boxes", "instances", "--candidates", "cam,nope"])


def test_without_boxed_images_label_boxes_plain_cams(tiny_model_path, boxed_shard, tmp_path, capsys):
    # Too few boxed images to cross-validate anything: calibrate keeps plain CAM and says why.
    few = tmp_path / "few.tfrecord"
    few.write_bytes(_first_records(boxed_shard, 3))
    thr = tmp_path / "thr.json"
    doc = calibrate.run(["--input", str(few), "--model", tiny_model_path, "--output", str(thr)])
    assert doc["method"] == {"name": "cam", "flip_tta": False, "boxes": "largest", "min_box_area": 0.01}
    assert doc["cam_contrast"] is False and "box_refine" not in doc
    # No thresholds file at all: label's defaults are plain CAM too.
    summary = label.run(["--input", boxed_shard, "--model", tiny_model_path, "--output", str(tmp_path / "o"),
                         f"--runner={RUNNER}"])
    opts = summary["options"]
    assert opts["thresholds_file"] is None and opts["cam_threshold"] == 0.2
    assert (opts["flip_tta"], opts["cam_contrast"], opts["boxes"], opts["box_refine"]) == (False, False, "largest",
                                                                                          False)


def _first_records(shard, n):
    import tensorflow as tf

    return b"".join(records.frame_record(r.numpy()) for r in tf.data.TFRecordDataset(shard).take(n))


@pytest.mark.parametrize("extra, match", [
    (["--candidates", "nope"], "no candidate 'nope'"),
    (["--candidates", "cam", "--cam_contrast"], "use one or the other"),
])
def test_calibrate_refuses_unknown_or_conflicting_candidates(extra, match, tiny_model_path, boxed_shard, tmp_path,
                                                             capsys):
    code = cli.main(["calibrate", "--input", boxed_shard, "--model", tiny_model_path,
                     "--output", str(tmp_path / "t.json"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and match in err and "Traceback" not in err


def test_a_malformed_method_in_the_file_is_refused(tiny_model_path, boxed_shard, tmp_path):
    from weakloc.models.thresholds import ThresholdsError

    thr = tmp_path / "thr.json"
    thr.write_text(json.dumps({"default": 0.5, "method": {"name": "cam", "boxes": "diagonal"}}))
    with pytest.raises(ThresholdsError, match="method.boxes in .* must be one of"):
        label.run(["--input", boxed_shard, "--model", tiny_model_path, "--output", str(tmp_path / "o"),
                   "--thresholds", str(thr), f"--runner={RUNNER}"])


def _one_hot_table(best_index, taus):
    """An iou_table (T, N) by hand: map i overlaps its truth perfectly at taus[best_index[i]] only."""
    table = np.zeros((len(taus), len(best_index)), np.float32)
    table[np.asarray(best_index), np.arange(len(best_index))] = 1.0
    return table


def test_per_class_thresholds_shrink_towards_the_overall_one():
    # 10 maps of class 0 right only at 0.6, 30 of class 1 only at 0.2, 4 of class 2 only at 0.4 (too few for its
    # own). Overall, 0.2 is right for most (30 of 44). Shrunk by 10: class 0 (10*0.6 + 10*0.2) / 20 = 0.40,
    # class 1 (30*0.2 + 10*0.2) / 40 = 0.20; with shrink 0 class 0 keeps 0.60.
    taus = np.round(np.arange(0, 1, 0.1), 2)
    classes = np.array([0] * 10 + [1] * 30 + [2] * 4)
    table = _one_hot_table([6] * 10 + [2] * 30 + [4] * 4, taus)
    n = len(classes)
    maps = choose.Maps(np.zeros((n, 4, 4), np.float32), np.ones(n, bool), [np.zeros((1, 4))] * n, classes)
    cand = choose.candidate("cam")
    shrunk = choose.fit(cand, maps, table, taus, min_per_class=10, shrink=10)
    assert shrunk.default == pytest.approx(0.2)
    assert shrunk.per_class == pytest.approx({0: 0.40, 1: 0.20})
    assert shrunk.per_class_fitted == {0: (pytest.approx(0.6), 10), 1: (pytest.approx(0.2), 30)}
    assert choose.fit(cand, maps, table, taus, min_per_class=10, shrink=0).per_class == pytest.approx({0: 0.6, 1: 0.2})
    # Huge shrink: every class ends at the overall threshold.
    assert choose.fit(cand, maps, table, taus, min_per_class=10, shrink=1e9).per_class == pytest.approx({0: 0.2,
                                                                                                         1: 0.2})
    assert metrics.shrunk_threshold(0.6, 0, 0.2, 0) == 0.2  # nothing fitted, nothing added: the overall one
    with pytest.raises(ValueError, match="shrink and n must be >= 0"):
        metrics.shrunk_threshold(0.6, 10, 0.2, -1)


def test_calibrate_records_the_shrink_it_applied(tiny_model_path, boxed_shard, tmp_path, capsys):
    thr = tmp_path / "thr.json"
    doc = calibrate.run(["--input", boxed_shard, "--model", tiny_model_path, "--output", str(thr),
                         "--candidates", "cam", "--min_per_class", "5", "--shrink", "7"])
    saved = json.loads(thr.read_text())
    assert saved["per_class_shrink"] == 7 and saved["per_class"]
    for name, rec in saved["calibration"]["per_class"].items():
        want = round((rec["pairs"] * rec["fitted"] + 7 * saved["default"]) / (rec["pairs"] + 7), 2)
        assert saved["per_class"][name] == pytest.approx(want) == rec["threshold"]
    assert "shrunk towards" in calibrate.render(doc) and "--shrink 7" in calibrate.render(doc)
    code = cli.main(["calibrate", "--input", boxed_shard, "--model", tiny_model_path,
                     "--output", str(tmp_path / "t.json"), "--shrink", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1] == "weakloc calibrate: error: --shrink must be >= 0, got -1.0"
