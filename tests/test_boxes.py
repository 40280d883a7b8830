"""Boxes from hand-drawn maps with exact expected boxes, degenerate maps, IoU and calibration on known maps."""
import numpy as np
import pytest

from weakloc.models import boxes, metrics


def _map(rows):
    return np.array(rows, dtype=np.float32)[None]


# A 4x5 map in the spirit of wsolevaluation's tests: two blobs, the left one larger.
M = _map(
    [
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [0.9, 1.0, 0.0, 0.0, 0.6],
        [0.8, 0.7, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.3, 0.0],
    ]
)


@pytest.mark.parametrize(
    "tau, expected",
    [
        (0.5, [0, 1, 2, 3]),  # left blob: rows 1-2, cols 0-1; max edge exclusive
        (0.85, [0, 1, 2, 2]),  # only 0.9 and 1.0 survive
        (1.0, [1, 1, 2, 2]),  # the single max pixel
        (0.2, [0, 1, 2, 3]),  # 0.3 and 0.6 are separate, smaller components
    ],
)
def test_largest_component_box_at_each_threshold(tau, expected):
    normed, valid = boxes.normalize_cams(M)
    found = boxes.boxes_from_cams(normed, tau, valid=valid)
    assert found.xyxy.tolist() == [expected]
    assert found.map_index.tolist() == [0]


def test_zero_threshold_covers_whole_map():
    normed, valid = boxes.normalize_cams(M)
    assert boxes.boxes_from_cams(normed, 0.0, valid=valid).xyxy.tolist() == [[0, 0, 5, 4]]


def test_eight_connectivity_joins_diagonal_pixels():
    m = _map([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    found = boxes.boxes_from_cams(m, 0.5)
    assert found.xyxy.tolist() == [[0, 0, 3, 3]]
    assert found.area.tolist() == [3]


def test_all_mode_keeps_components_above_area_and_always_the_largest():
    normed, valid = boxes.normalize_cams(M)
    # components at tau 0.2: left blob (4 px), (1,4) 0.6 (1 px), (3,3) 0.3 (1 px); 20 px in the map
    found = boxes.boxes_from_cams(normed, 0.2, valid=valid, mode="all", min_area=0.05)
    assert sorted(found.xyxy.tolist()) == sorted([[0, 1, 2, 3], [4, 1, 5, 2], [3, 3, 4, 4]])
    found = boxes.boxes_from_cams(normed, 0.2, valid=valid, mode="all", min_area=0.5)
    assert found.xyxy.tolist() == [[0, 1, 2, 3]]


def test_cam_score_is_mean_normalised_value_inside_box():
    normed, valid = boxes.normalize_cams(M)
    found = boxes.boxes_from_cams(normed, 0.5, valid=valid)
    assert found.cam_score[0] == pytest.approx((0.9 + 1.0 + 0.8 + 0.7) / 4)


def test_normalisation_is_min_max_per_map():
    cams = np.stack([M[0] * 5 + 2, M[0] - 7])
    normed, valid = boxes.normalize_cams(cams)
    assert valid.tolist() == [True, True]
    np.testing.assert_allclose(normed[0], M[0], atol=1e-6)
    np.testing.assert_allclose(normed[1], M[0], atol=1e-6)


def test_degenerate_maps_get_no_box():
    flat = np.full((1, 4, 5), 3.0, np.float32)
    nan = np.full((1, 4, 5), np.nan, np.float32)
    stack = np.concatenate([flat, nan, M])
    normed, valid = boxes.normalize_cams(stack)
    assert valid.tolist() == [False, False, True]
    assert np.all(normed[:2] == 0)
    found = boxes.boxes_from_cams(normed, 0.0, valid=valid)
    assert found.map_index.tolist() == [2]  # only the real map, even at tau 0


def test_nan_pixels_count_as_minimum():
    m = M.copy()
    m[0, 0, 0] = np.nan
    m[0, 3, 0] = np.inf
    normed, valid = boxes.normalize_cams(m)
    assert valid[0] and normed[0, 0, 0] == 0.0 and normed[0, 3, 0] == 0.0
    assert boxes.boxes_from_cams(normed, 0.5, valid=valid).xyxy.tolist() == [[0, 1, 2, 3]]


def test_all_below_threshold_gives_no_box():
    # Unnormalised input below tau everywhere: nothing is foreground.
    found = boxes.boxes_from_cams(np.full((2, 3, 3), 0.1, np.float32), 0.5)
    assert len(found.map_index) == 0 and found.xyxy.shape == (0, 4)


def test_batch_of_maps_labelled_together_keeps_maps_apart():
    a = np.zeros((6, 6), np.float32)
    a[1:3, 1:4] = 1
    b = np.zeros((6, 6), np.float32)
    b[4:6, 0:2] = 1
    b[0, 5] = 1
    stack = np.stack([a, b, a])
    found = boxes.boxes_from_cams(stack, np.array([0.5, 0.5, 0.5]))
    assert found.map_index.tolist() == [0, 1, 2]
    assert found.xyxy.tolist() == [[1, 1, 4, 3], [0, 4, 2, 6], [1, 1, 4, 3]]


def test_per_map_thresholds():
    stack = np.concatenate([M, M])
    normed, valid = boxes.normalize_cams(stack)
    found = boxes.boxes_from_cams(normed, np.array([0.5, 1.0]), valid=valid)
    assert found.xyxy.tolist() == [[0, 1, 2, 3], [1, 1, 2, 2]]


def test_scale_boxes_maps_continuous_coordinates():
    # 64x64 model input to a 480x640 (H, W) photo: x scales by 10, y by 7.5
    out = boxes.scale_boxes(np.array([[0, 0, 64, 64], [8, 16, 9, 17]]), (64, 64), (480, 640))
    np.testing.assert_allclose(out, [[0, 0, 640, 480], [80, 120, 90, 127.5]])


@pytest.mark.parametrize(
    "a, b, iou",
    [
        ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7),  # overlap 1, union 4 + 4 - 1
        ([0, 0, 2, 2], [0, 0, 2, 2], 1.0),
        ([0, 0, 2, 2], [2, 0, 4, 2], 0.0),  # touching edges share no area (max edge exclusive)
        ([0, 0, 4, 4], [1, 1, 3, 3], 4 / 16),
        ([0, 0, 10, 1], [0, 0, 5, 1], 0.5),
    ],
)
def test_box_iou_against_hand_computed(a, b, iou):
    assert boxes.box_iou(np.array([a]), np.array([b]))[0, 0] == pytest.approx(iou, abs=1e-6)


def test_calibration_finds_the_threshold_that_fits_known_truth():
    # Maps are a bright core (value 1) in a dimmer halo (value 0.4) on 0.1; the truth is the core, so any
    # tau in (0.4, 1] recovers it exactly and tau <= 0.4 gives the halo (IoU 4/36 < 0.3).
    n = 5
    maps = np.full((n, 12, 12), 0.1, np.float32)
    truths = []
    for i in range(n):
        y, x = i, 2 * i % 6
        maps[i, y : y + 6, x : x + 6] = 0.4
        maps[i, y + 2 : y + 4, x + 2 : x + 4] = 1.0
        truths.append(np.array([[x + 2, y + 2, x + 4, y + 4]], np.float32))
    normed, valid = boxes.normalize_cams(maps)
    sweep = metrics.sweep_thresholds(normed, truths, valid=valid)
    # normalised halo = (0.4 - 0.1) / 0.9 = 1/3: thresholds above it isolate the core.
    assert sweep.best_threshold == pytest.approx(0.34)
    assert sweep.accuracy[sweep.best_index].tolist() == [1.0, 1.0, 1.0]
    assert sweep.accuracy[0].tolist() == [0.0, 0.0, 0.0]  # tau 0: the whole map
    assert sweep.max_box_acc_v2 == pytest.approx(100.0)


def _row(top1, boxes_, truths, w=100, h=50):
    box = lambda c, b: dict(class_id=c, label=str(c), score=0.9, cam_score=0.5, xmin=b[0], ymin=b[1], xmax=b[2], ymax=b[3])
    gt = lambda c, b: dict(class_id=c, label=str(c), xmin=b[0], ymin=b[1], xmax=b[2], ymax=b[3])
    return {"classes": [dict(class_id=top1, label=str(top1), score=0.9)], "width": w, "height": h,
            "boxes": [box(c, b) for c, b in boxes_], "gt_boxes": [gt(c, b) for c, b in truths]}


def test_evaluate_rows_against_hand_computed_scores():
    rows = [
        _row(0, [(0, [0, 0, 10, 10])], [(0, [0, 0, 10, 10])]),  # exact: IoU 1, top-1 right
        _row(1, [(0, [0, 0, 10, 10])], [(0, [0, 0, 20, 10])]),  # IoU 0.5, top-1 wrong
        _row(1, [(1, [0, 0, 10, 10])], [(0, [50, 0, 60, 10])]),  # no box for true class 0: IoU 0
        _row(2, [], []),  # no ground truth: not scored
    ]
    ev = metrics.evaluate_rows(rows, ["a", "b", "c"])
    assert ev["images"] == 3 and ev["pairs"] == 3
    assert ev["top1"] == pytest.approx(1 / 3)
    assert ev["gt_known"] == {0.3: pytest.approx(2 / 3), 0.5: pytest.approx(2 / 3), 0.7: pytest.approx(1 / 3)}
    assert ev["top1_loc"][0.5] == pytest.approx(1 / 3)
    assert ev["mean_iou"] == pytest.approx(0.5)
    assert ev["per_class"]["a"]["corloc"][0.5] == pytest.approx(2 / 3)
    # Full image 100x50 against 10x10, 20x10 and 10x10 true boxes: IoU 0.02, 0.04, 0.02.
    assert ev["baselines"]["full_image"]["mean_iou"] == pytest.approx(0.08 / 3, rel=1e-4)
    # Median relative size 0.1 x 0.2 centred: box [45, 20, 55, 30]; IoU with [50, 0, 60, 10] is 0.
    assert ev["baselines"]["centred_median"]["gt_known"][0.3] == 0.0
    with pytest.raises(ValueError, match="nothing to evaluate"):
        metrics.evaluate_rows([_row(0, [], [])], ["a"])


def _core_halo_maps(n, halo, seed_offset=0):
    """Maps with a bright core (1.0) in a halo of value `halo` on 0.1; the truth is the core."""
    maps = np.full((n, 12, 12), 0.1, np.float32)
    truths = []
    for i in range(n):
        y, x = i % 5, (2 * i + seed_offset) % 6
        maps[i, y : y + 6, x : x + 6] = halo
        maps[i, y + 2 : y + 4, x + 2 : x + 4] = 1.0
        truths.append(np.array([[x + 2, y + 2, x + 4, y + 4]], np.float32))
    return maps, truths


def test_per_class_calibration_finds_each_class_threshold():
    # Class 0: halo 0.4 -> normalised 1/3, so the core needs tau in (0.333, 1]: first best 0.34.
    # Class 1: the truth is the core *with* its halo (6x6), halo 0.2 -> normalised 1/9, so tau in (0, 0.111]
    # (tau 0.00 keeps the whole 12x12 map, IoU 0.25): first best 0.01. The two ranges do not overlap.
    # Class 2 has 2 maps, below min_per_class.
    m0, t0 = _core_halo_maps(6, 0.4)
    m1, cores = _core_halo_maps(6, 0.2)
    t1 = [np.array([[b[0, 0] - 2, b[0, 1] - 2, b[0, 2] + 2, b[0, 3] + 2]], np.float32) for b in cores]
    m2, t2 = _core_halo_maps(2, 0.4)
    maps = np.concatenate([m0, m1, m2])
    normed, valid = boxes.normalize_cams(maps)
    classes = [0] * 6 + [1] * 6 + [2] * 2
    cal = metrics.calibrate(normed, t0 + t1 + t2, classes, valid=valid, min_per_class=3)
    assert cal.per_class[0].best_threshold == pytest.approx(0.34)
    assert cal.per_class[1].best_threshold == pytest.approx(0.01)
    assert 2 not in cal.per_class and cal.counts == {0: 6, 1: 6, 2: 2}
    doc = cal.thresholds(["zero", "one", "two"]).to_json()
    assert doc["per_class"] == {"zero": pytest.approx(0.34), "one": pytest.approx(0.01)}
    # No single tau fits both: overall, classes 0 and 2 (8 maps) outvote class 1 (6 maps, whose 2x2 core has
    # IoU 4/36 with its 6x6 truth at tau 0.34, a miss at every level).
    assert doc["default"] == pytest.approx(0.34)
    assert cal.overall.accuracy[cal.overall.best_index].mean() == pytest.approx(8 / 14)
    # MaxBoxAccV2 of class 1 alone: every level reaches 100% at its best tau.
    assert cal.per_class[1].max_box_acc_v2 == pytest.approx(100.0)


def test_evaluate_rows_multiple_classes_and_boxes_per_image():
    # One image, two true classes; class 0 has two true boxes and the prediction matches the second exactly;
    # class 1's predicted box [0,0,10,10] against truth [5,0,15,10]: overlap 50, union 150 -> IoU 1/3.
    rows = [_row(1, [(0, [40, 0, 50, 10]), (1, [0, 0, 10, 10])],
                 [(0, [0, 0, 10, 10]), (0, [40, 0, 50, 10]), (1, [5, 0, 15, 10])])]
    ev = metrics.evaluate_rows(rows, ["a", "b"])
    assert ev["pairs"] == 2 and ev["images"] == 1 and ev["top1"] == 1.0
    assert ev["gt_known"][0.3] == pytest.approx(1.0) and ev["gt_known"][0.5] == pytest.approx(0.5)
    assert ev["top1_loc"][0.3] == pytest.approx(0.5)  # only class 1 is the top-1 class
    assert ev["per_class"]["b"]["mean_iou"] == pytest.approx(1 / 3, rel=1e-5)
    assert ev["mean_iou"] == pytest.approx((1 + 1 / 3) / 2, rel=1e-5)


def test_union_mode_boxes_all_kept_components_together():
    m = np.zeros((2, 10, 10), np.float32)
    m[0, 1:3, 1:3] = 1.0  # 4 px
    m[0, 6:9, 5:9] = 1.0  # 12 px
    m[0, 0, 9] = 1.0  # 1 px: below the 3% floor, left out
    m[1, 4, 4] = 1.0  # a lone pixel: below the floor but the largest of its map, so kept
    found = boxes.boxes_from_cams(m, 0.5, mode="union", min_area=0.03)
    assert found.map_index.tolist() == [0, 1]
    assert found.xyxy.tolist() == [[1, 1, 9, 9], [4, 4, 5, 5]]
    assert found.area.tolist() == [16, 1]
    assert found.cam_score[0] == pytest.approx(16 / 64)  # 16 foreground pixels of the 8x8 box


def test_stretch_boxes_about_the_centre_and_clip():
    # Centre (15, 20), half size (5, 10) -> (2.5, 20): [12.5, 0, 17.5, 40], the top clipped from -0 to 0.
    out = boxes.stretch_boxes(np.array([[10, 10, 20, 30]]), (0.5, 2.0), (100, 100))
    assert out.tolist() == [[12.5, 0.0, 17.5, 40.0]]
    assert boxes.stretch_boxes(np.array([[0, 0, 10, 10]]), (2.0, 1.0), (50, 12)).tolist() == [[0, 0, 12, 10]]


def test_fit_box_stretch_finds_the_height_factor_truth_needs():
    # Square 10x10 predictions, truths 10 wide and 14.6 tall with the same centre. IoU >= 0.9 needs a height
    # of at least 13.14, i.e. factor >= 1.314: 1.35 is the first on the 0.05 grid (13.5 / 14.6 = 0.925, while
    # 1.30 gives 0.890); any width change drops below 0.9 (0.95: 0.878; 1.05: 0.884).
    pred = np.array([[10, 10, 20, 20], [40, 40, 50, 50]], np.float32)
    truths = [np.array([[10, 7.7, 20, 22.3]], np.float32), np.array([[40, 37.7, 50, 52.3]], np.float32)]
    (fw, fh), after, before = metrics.fit_box_stretch(pred, truths, (100, 100), levels=(0.5, 0.9))
    assert (fw, fh) == (1.0, pytest.approx(1.35))
    assert before == pytest.approx(0.5) and after == pytest.approx(1.0)


def _reference_boxes(normed, thresholds, *, valid=None, mode="largest", min_area=0.0):
    """The box step as it was before OpenCV labelled components: one scipy.ndimage.label call and find_objects.

    Kept here, independent of models/boxes.py, as the reference the faster path must match box for box.
    """
    from scipy import ndimage

    n, h, w = normed.shape
    tau = np.broadcast_to(np.asarray(thresholds, dtype=np.float32), (n,))
    mask = normed >= tau[:, None, None]
    if valid is not None:
        mask &= np.asarray(valid, dtype=bool)[:, None, None]
    if not mask.any():
        return [], [], [], []
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labels, count = ndimage.label(mask, structure=structure)
    slices = ndimage.find_objects(labels)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    map_of = np.array([s[0].start for s in slices])
    order = np.lexsort((np.arange(count), -sizes, map_of))
    _, first = np.unique(map_of[order], return_index=True)
    is_largest = np.zeros(count, dtype=bool)
    is_largest[order[first]] = True
    if mode == "largest":
        keep = order[first]
    else:
        keep = order[((sizes >= min_area * h * w) | is_largest)[order]]
    boxes_ = [[s[2].start, s[1].start, s[2].stop, s[1].stop] for s in (slices[k] for k in keep)]
    maps = map_of[keep].tolist()
    areas = sizes[keep].tolist()
    if mode == "union":
        merged = {}
        for m, b, a in zip(maps, boxes_, areas):
            old = merged.get(m)
            merged[m] = (b, a) if old is None else (
                [min(old[0][0], b[0]), min(old[0][1], b[1]), max(old[0][2], b[2]), max(old[0][3], b[3])], old[1] + a)
        maps = sorted(merged)
        boxes_ = [merged[m][0] for m in maps]
        areas = [merged[m][1] for m in maps]
    scores = [float(normed[m, y0:y1, x0:x1].mean()) for m, (x0, y0, x1, y1) in zip(maps, boxes_)]
    return maps, boxes_, scores, areas


@pytest.mark.parametrize("mode", ["largest", "all", "union"])
def test_boxes_match_the_scipy_reference_on_fragmented_random_maps(mode):
    # Noise maps split into hundreds of components with many equal sizes, so the tie rule (first in raster
    # order) and the per-map separation are exercised, not just the one-blob case.
    rng = np.random.default_rng(7)
    for trial in range(60):
        n, h, w = rng.integers(1, 7), rng.integers(1, 40), rng.integers(1, 40)
        if trial % 3 == 0:
            maps = rng.random((n, h, w)).astype(np.float32)
        elif trial % 3 == 1:
            maps = rng.integers(0, 3, (n, h, w)).astype(np.float32)  # plateaus: many ties
        else:
            maps = (rng.random((n, h, w)) < 0.3).astype(np.float32)
        normed, valid = boxes.normalize_cams(maps)
        valid &= rng.random(n) < 0.9
        tau = rng.random(n).astype(np.float32) if trial % 2 else float(rng.random())
        for min_area in (0.0, 0.01, 0.1):
            found = boxes.boxes_from_cams(normed, tau, valid=valid, mode=mode, min_area=min_area)
            maps_, xyxy, scores, areas = _reference_boxes(normed, tau, valid=valid, mode=mode, min_area=min_area)
            assert found.map_index.tolist() == maps_
            assert found.xyxy.tolist() == xyxy
            np.testing.assert_allclose(found.cam_score, scores, rtol=1e-6)  # a mean: summation order
            assert found.area.tolist() == areas


def test_components_are_numbered_as_scipy_numbers_them():
    from scipy import ndimage

    rng = np.random.default_rng(11)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    for _ in range(20):
        mask = rng.random((8, 33, 47)) < rng.uniform(0.2, 0.7)
        comps = boxes.components(mask)
        labels, count = comps.labels, comps.count
        expected, expected_count = ndimage.label(mask, structure=structure)
        assert count == expected_count
        np.testing.assert_array_equal(labels, expected)


def test_boxes_of_many_components_in_one_map_use_the_whole_stack_pass():
    # 18 isolated pixels in a 1-map stack: more than 8 kept components per map takes the find_objects branch.
    m = np.zeros((1, 6, 12), np.float32)
    m[0, ::2, ::2] = 1.0
    found = boxes.boxes_from_cams(m, 0.5, mode="all", min_area=0.0)
    assert len(found.xyxy) == 18
    assert found.xyxy[:3].tolist() == [[0, 0, 1, 1], [2, 0, 3, 1], [4, 0, 5, 1]]
    assert set(found.area.tolist()) == {1}
