"""Box refinement (models/refine.py) and contrast CAMs: blurred maps of known rectangles, a reference formula,
round trips through JSON and through `label`'s options."""
import json

import numpy as np
import pytest
from scipy import ndimage

from weakloc.models import boxes as boxlib
from weakloc.models import refine
from weakloc.models.metrics import best_iou


def blurred_rectangles(n, seed, size=64, sigma=4.0):
    """Maps made by blurring a filled rectangle of random size and place with a fixed Gaussian (a CAM's
    receptive field), with the rectangle as the true box. Small rectangles blur into blobs larger than
    themselves, so a fixed threshold boxes them too large: the error refinement must learn."""
    rng = np.random.default_rng(seed)
    maps, truths = [], []
    for _ in range(n):
        w, h = rng.integers(4, 30, size=2)
        x0, y0 = rng.integers(4, size - 4 - w), rng.integers(4, size - 4 - h)
        m = np.zeros((size, size), np.float32)
        m[y0 : y0 + h, x0 : x0 + w] = 1.0
        maps.append(ndimage.gaussian_filter(m, sigma))
        truths.append(np.array([[x0, y0, x0 + w, y0 + h]], np.float32))
    normed, valid = boxlib.normalize_cams(np.stack(maps))
    return normed, valid, truths


def base_boxes(normed, valid, tau=0.5):
    found = boxlib.boxes_from_cams(normed, tau, valid=valid)
    assert len(found.map_index) == len(normed)
    return found.xyxy


def test_refinement_learns_the_blur_and_generalises_to_new_maps():
    normed, valid, truths = blurred_rectangles(120, seed=0)
    refiner, report = refine.fit(normed, 0.5, truths, valid=valid)
    # Held-out maps from the same process: the refined boxes must be much closer to the rectangles.
    t_normed, t_valid, t_truths = blurred_rectangles(200, seed=1)
    before = best_iou(base_boxes(t_normed, t_valid), t_truths)
    refined, has = refiner.apply(t_normed, 0.5, t_valid)
    assert has.all()
    after = best_iou(refined, t_truths)
    assert (before >= 0.7).mean() < 0.7  # the blur really breaks the fixed-threshold boxes at IoU 0.7 ...
    assert (after >= 0.7).mean() > 0.85  # ... and the profile across thresholds undoes it (0.63 -> 0.90 here)
    assert (after >= 0.5).mean() > 0.95 and after.mean() > before.mean() + 0.05
    # Cross-validation on the fitting maps saw the same gain, so calibrate keeps it.
    assert report.gain > 5 and report.chosen_alpha in refine.ALPHAS and report.pairs == 120


def shifting_refiner(dx, dy, log_w=0.0, log_h=0.0, taus=(0.3, 0.6)):
    """A refinement whose only non-zero coefficients are the intercepts: a fixed offset and size ratio."""
    f = 2 + 4 * len(taus)
    coef = np.zeros((f + 1, 4))
    coef[-1] = (dx, dy, log_w, log_h)
    return refine.BoxRefiner(tuple(taus), np.zeros(f), np.ones(f), coef, 1.0)


def test_refined_boxes_stay_inside_the_map_and_at_least_a_pixel_wide():
    normed, valid, _ = blurred_rectangles(60, seed=2)
    for ref in (shifting_refiner(0, 0, 3.0, 3.0), shifting_refiner(50.0, -50.0), shifting_refiner(0, 0, -3.0, -3.0)):
        out, has = ref.apply(normed, 0.5, valid)
        assert has.all() and out.dtype == np.float32 and out.shape == (60, 4)
        assert (out[:, :2] >= 0).all() and (out[:, 2:] <= 64).all()
        assert (out[:, 2:] - out[:, :2] >= 1.0 - 1e-6).all()
    # The identity refinement gives the base boxes back exactly.
    out, _ = shifting_refiner(0, 0).apply(normed, 0.5, valid)
    np.testing.assert_allclose(out, base_boxes(normed, valid), atol=1e-5)


def test_profile_follows_the_object_not_a_larger_blob_elsewhere():
    """A sharp object (peak 1) and, far from it, a broad blob peaking at 0.55: at the base threshold 0.6 only the
    object is boxed; at 0.2-0.5 the blob is the largest component but the profile must stay on the object."""
    yy, xx = np.mgrid[0:64, 0:64]
    obj = np.exp(-((xx - 10.5) ** 2 + (yy - 10.5) ** 2) / (2 * 3.0**2))
    blob = 0.55 * np.exp(-((xx - 46) ** 2 + (yy - 46) ** 2) / (2 * 9.0**2))
    alone, both = obj[None].astype(np.float32), np.maximum(obj, blob)[None].astype(np.float32)
    base_a, has_a, feats_a = refine.profile_features(alone, [0.6])
    base_b, has_b, feats_b = refine.profile_features(both, [0.6])
    assert has_a.all() and has_b.all()
    np.testing.assert_array_equal(base_a, base_b)
    assert boxlib.boxes_from_cams(both, 0.3).xyxy[0][0] > 20  # the blob really is the largest component there
    np.testing.assert_allclose(feats_b, feats_a)


def test_json_round_trip_gives_the_same_boxes():
    normed, valid, truths = blurred_rectangles(40, seed=3)
    refiner, _ = refine.fit(normed, 0.5, truths, valid=valid)
    again = refine.BoxRefiner.from_json(json.loads(json.dumps(refiner.to_json())))
    np.testing.assert_array_equal(again.apply(normed, 0.5, valid)[0], refiner.apply(normed, 0.5, valid)[0])


@pytest.mark.parametrize("doc, message", [
    ([1, 2], "expected an object"),
    ({"taus": [0.5]}, "malformed"),
    ({"taus": [0.5], "mean": [0] * 5, "scale": [1] * 5, "coef": [[0] * 4] * 6}, "expected 6 features"),
    ({"taus": [0.5], "mean": [0] * 6, "scale": [0] * 6, "coef": [[0] * 4] * 7}, "positive"),
    ({"taus": [0.5], "mean": [0] * 6, "scale": [1] * 6, "coef": [[1e300] * 4] * 7}, "within"),
    ({"taus": [1.5], "mean": [0] * 6, "scale": [1] * 6, "coef": [[0] * 4] * 7}, "within"),
])
def test_malformed_refinement_is_refused(doc, message):
    with pytest.raises(refine.RefineError, match=message):
        refine.BoxRefiner.from_json(doc)


def test_too_few_maps_to_fit_is_refused():
    normed, valid, truths = blurred_rectangles(refine.MIN_PAIRS - 1, seed=4)
    with pytest.raises(refine.RefineError, match="at least"):
        refine.fit(normed, 0.5, truths, valid=valid)


def test_contrast_cams_follow_the_reference_formula():
    """CAM_c = sum_k (w_kc - mean_c' w_kc') f_k, computed here with numpy from the model's own layers."""
    import keras

    from weakloc.models.cam import CamModel
    from weakloc.models.train import cam_cnn

    model = cam_cnn((32, 32), 5, width=2)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    plain = CamModel(model, input_size=(32, 32), scale=1 / 255, offset=0.0, top_k=2)
    contrast = CamModel(model, input_size=(32, 32), scale=1 / 255, offset=0.0, top_k=2, contrast=True)
    a, b = plain(images, extra=[[4], [0], [1]]), contrast(images, extra=[[4], [0], [1]])
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)  # the scores do not change
    feats = keras.Model(model.inputs, model.get_layer("features_relu").output)(images / 255.0).numpy()
    w = model.get_layer("classifier").kernel.numpy()
    w = w - w.mean(axis=1, keepdims=True)
    expected = np.einsum("bhwk,kbm->bmhw", feats, w[:, b.cam_classes])
    np.testing.assert_allclose(b.low_res, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(a.low_res, b.low_res)
