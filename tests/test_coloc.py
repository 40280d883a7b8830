"""Co-localization maths (models/coloc.py): statistics against numpy's PCA, merge order, the sign rule, a map on
hand-made features with a known object, fused maps' invariants, and the file format's round trip and refusals."""
import json

import numpy as np
import pytest

from weakloc.models import boxes as boxlib
from weakloc.models import coloc


def _descriptors(rng, n=400, k=12):
    """Correlated descriptors with one dominant direction, shifted off zero as ReLU features are."""
    basis = rng.normal(size=(k, k))
    scales = np.linspace(3.0, 0.2, k)
    return rng.normal(size=(n, k)) * scales @ basis + 2.0


def _unsigned(x):
    """Statistics of descriptors with a flat class map: the sign rule has nothing to go by."""
    return coloc.ClassStats.of(x, np.zeros(x.shape[:-1]))


def test_component_matches_numpy_pca(rng):
    x = _descriptors(rng)
    stats = _unsigned(x)
    comp = coloc.principal_component(stats)
    # Reference: numpy's covariance (population) and full eigendecomposition, independent of the sums kept.
    cov = np.cov(x, rowvar=False, bias=True)
    vals, vecs = np.linalg.eigh(cov)
    ref = vecs[:, -1]
    np.testing.assert_allclose(stats.covariance(), cov, atol=1e-9)
    np.testing.assert_allclose(comp.mean, x.mean(axis=0), rtol=1e-6)
    assert abs(abs(float(np.dot(comp.direction, ref))) - 1.0) < 1e-5
    assert comp.eigenvalue == pytest.approx(vals[-1], rel=1e-9)
    assert comp.explained == pytest.approx(vals[-1] / vals.sum(), rel=1e-9)
    # The projection equals the first principal-component score of centred data (sign aside).
    proj = coloc.project(x.reshape(1, 20, 20, -1), comp.mean[None, None], comp.direction[None, None])
    scores = (x - x.mean(axis=0)) @ ref
    assert abs(np.corrcoef(proj.ravel(), scores)[0, 1]) > 1 - 1e-5


def test_merging_in_any_grouping_gives_the_same_statistics(rng):
    x = _descriptors(rng, n=600)
    r = x @ rng.normal(size=x.shape[1])  # a CAM of the descriptors
    parts = np.array_split(np.arange(600), 7)
    one = coloc.ClassStats.of(x, r)
    serial = coloc.ClassStats.zeros(x.shape[1])
    for p in parts:
        serial.add(coloc.ClassStats.of(x[p], r[p]))
    left = coloc.ClassStats.zeros(x.shape[1])
    for p in parts[:3]:
        left.add(coloc.ClassStats.of(x[p], r[p]))
    right = coloc.ClassStats.zeros(x.shape[1])
    for p in parts[3:][::-1]:
        right.add(coloc.ClassStats.of(x[p], r[p]))
    tree = coloc.ClassStats.zeros(x.shape[1]).add(right).add(left)
    for s in (serial, tree):
        assert (s.images, s.count) == (7, 600)
        np.testing.assert_allclose(s.total, one.total, rtol=1e-12)
        np.testing.assert_allclose(s.outer, one.outer, rtol=1e-10)
        np.testing.assert_allclose(s.cross, one.cross, rtol=1e-10)
        assert s.map_total == pytest.approx(one.map_total, rel=1e-12)
    a, b = coloc.principal_component(serial), coloc.principal_component(tree)
    np.testing.assert_allclose(np.abs(a.direction), np.abs(b.direction), atol=1e-5)


def test_sign_follows_the_class_map(rng):
    x = _descriptors(rng)
    free = coloc.principal_component(_unsigned(x))
    for w in (free.direction, -free.direction):
        cam = x @ (w + 0.01 * rng.normal(size=w.shape))  # the CAM of class weights near +-v
        comp = coloc.principal_component(coloc.ClassStats.of(x, cam))
        # On the head's own features the rule is v . w_c >= 0 (the module docstring) ...
        assert float(np.dot(comp.direction, w)) > 0
        # ... because the projection then correlates positively with the CAM over the pool.
        p = (x - x.mean(0)) @ comp.direction
        assert np.corrcoef(p, cam)[0, 1] > 0


def test_map_on_hand_made_features_marks_the_shared_object():
    """Images of one class: background cells are noise in channels 0-3, object cells carry a shared pattern in
    channels 4-7 at a different place in each image. The projection must be high exactly on the object."""
    rng = np.random.default_rng(7)
    k, size = 8, 12
    pattern = np.array([0, 0, 0, 0, 3.0, 2.0, 2.5, 1.5])
    feats, truths = [], []
    for _ in range(10):
        f = np.zeros((size, size, k))
        f[..., :4] = rng.uniform(0, 1, size=(size, size, 4))
        y0, x0 = rng.integers(0, size - 5, 2)
        f[y0 : y0 + 4, x0 : x0 + 5, :] += pattern * rng.uniform(0.8, 1.2)
        feats.append(f)
        truths.append(np.array([[x0, y0, x0 + 5, y0 + 4]], np.float32))
    stats = coloc.ClassStats.zeros(k)
    for f, t in zip(feats, truths):
        # The class's CAM comes on a coarser grid (a 6 x 6 head over this 12 x 12 layer, as --coloc_layer
        # reads an earlier map): a blurred blob over the object, which only has to sign the component.
        x0, y0, x1, y1 = t[0].astype(int)
        coarse = np.zeros((size // 2, size // 2))
        coarse[y0 // 2 : (y1 + 1) // 2, x0 // 2 : (x1 + 1) // 2] = 1.0
        stats.add(coloc.ClassStats.of(f, coarse))
    assert stats.images == 10 and stats.count == 10 * size * size
    comp = coloc.principal_component(stats)
    maps = coloc.project(np.stack(feats), np.tile(comp.mean, (10, 1, 1)),
                         np.tile(comp.direction, (10, 1, 1)))[:, 0]
    normed, valid = boxlib.normalize_cams(maps)
    found = boxlib.boxes_from_cams(normed, 0.5, valid=valid)
    assert valid.all() and len(found.map_index) == 10
    np.testing.assert_array_equal(found.xyxy, np.concatenate(truths))
    # Positive on the object, negative on the background (the mean is between them).
    for m, t in zip(maps, truths):
        x0, y0, x1, y1 = t[0].astype(int)
        assert m[y0:y1, x0:x1].min() > 0 and np.delete(m.ravel(), np.ravel_multi_index(
            np.mgrid[y0:y1, x0:x1].reshape(2, -1), m.shape)).max() < 0


def test_principal_component_refuses_degenerate_pools():
    with pytest.raises(coloc.ColocError, match="at least 2 descriptors"):
        coloc.principal_component(_unsigned(np.ones((1, 4))))
    with pytest.raises(coloc.ColocError, match="do not vary"):
        coloc.principal_component(_unsigned(np.ones((5, 4))))
    with pytest.raises(ValueError, match="does not go with"):
        coloc.ClassStats.of(np.ones((5, 4)), np.ones(4))
    with pytest.raises(coloc.ColocError, match="channels"):
        coloc.ClassStats.zeros(3).add(coloc.ClassStats.zeros(4))


@pytest.mark.parametrize("mode", coloc.FUSE_MODES)
def test_fused_maps_invariants(rng, mode):
    cams = rng.normal(size=(4, 2, 5, 6)) * 10 + 3
    cols = rng.normal(size=(4, 2, 5, 6)) * 0.01 - 7
    cams[0, 0] = 5.0  # constant CAM: the co-localization map alone
    cols[1, 1] = -1.0  # constant co-localization map: the CAM alone
    cams[2, 0] = 1.0
    cols[2, 0] = 2.0  # both constant: zeros
    out = coloc.fuse(cams, cols, mode)
    assert out.shape == cams.shape and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    a, _ = coloc.minmax(cams)
    b, _ = coloc.minmax(cols)
    np.testing.assert_allclose(out[0, 0], b[0, 0], atol=1e-6)
    np.testing.assert_allclose(out[1, 1], a[1, 1], atol=1e-6)
    assert not out[2, 0].any()
    # Neither map's units matter: rescaling and shifting an input leaves the fusion unchanged.
    np.testing.assert_allclose(coloc.fuse(cams * 1000 - 5, cols * 0.5 + 2, mode), out, atol=1e-4)
    # Symmetric, and a map fused with itself is itself, normalised.
    np.testing.assert_allclose(coloc.fuse(cols, cams, mode), out, atol=1e-6)
    np.testing.assert_allclose(coloc.fuse(cams, cams, mode), a, atol=1e-6)
    # Reference formulas where both vary.
    ref = np.sqrt(a * b) if mode == "product" else (a + b) / 2
    np.testing.assert_allclose(out[3], ref[3], atol=1e-6)
    with pytest.raises(ValueError, match="fuse mode"):
        coloc.fuse(cams, cols, "max")


def test_minmax_handles_nan_and_any_leading_axes():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    x[1, 0, 0] = np.nan
    normed, valid = coloc.minmax(x[None])
    assert normed.shape == (1, 2, 3, 4) and valid.tolist() == [[True, True]]
    assert normed[0, 0, 0, 0] == 0.0 and normed[0, 0, -1, -1] == 1.0 and normed[0, 1, 0, 0] == 0.0


def _saved(tmp_path, rng):
    from weakloc.models.coloc import write_stats

    x = _descriptors(rng, k=6)
    r = x @ rng.normal(size=6)
    stats = {2: coloc.ClassStats.of(x[:200], r[:200]), 0: coloc.ClassStats.of(x[200:], r[200:])}
    comps = {c: coloc.principal_component(s) for c, s in stats.items()}
    extractor = {"model_sha256_16": "abc", "feature_layer": "out_relu", "channels": 6, "flip_tta": False}
    write_stats(str(tmp_path), [(c, stats[c], comps[c]) for c in stats], ["a", "b", "c"], extractor)
    return stats, comps, extractor


def test_file_round_trip(tmp_path, rng):
    from weakloc.models.coloc import read_stats

    stats, comps, extractor = _saved(tmp_path, rng)
    back = read_stats(str(tmp_path), class_names=["a", "b", "c"], extractor=extractor)
    assert sorted(back.stats) == [0, 2]
    for c in (0, 2):
        np.testing.assert_array_equal(back.stats[c].outer, stats[c].outer)
        np.testing.assert_array_equal(back.stats[c].cross, stats[c].cross)
        assert back.stats[c].map_total == stats[c].map_total
        np.testing.assert_array_equal(back.components[c].direction, comps[c].direction)
        assert back.stats[c].count == stats[c].count
    light = read_stats(str(tmp_path), with_stats=False)
    assert light.stats == {} and sorted(light.components) == [0, 2]
    np.testing.assert_array_equal(light.components[2].mean, comps[2].mean)
    man = json.loads((tmp_path / coloc.MANIFEST_FILE).read_text())
    assert man["format"] == coloc.FORMAT and man["classes"]["c"]["class_id"] == 2
    assert man["classes"]["a"]["descriptors"] == stats[0].count
    assert sorted(p.name for p in tmp_path.iterdir()) == [coloc.MANIFEST_FILE, coloc.STATS_FILE]  # no temp left


def test_load_refuses_other_features_format_and_classes(tmp_path, rng):
    from weakloc.models.coloc import read_stats

    _, _, extractor = _saved(tmp_path, rng)
    with pytest.raises(coloc.ColocError, match="model_sha256_16: file 'abc', this run 'xyz'"):
        read_stats(str(tmp_path), extractor={**extractor, "model_sha256_16": "xyz"})
    with pytest.raises(coloc.ColocError, match="is not that class"):
        read_stats(str(tmp_path), class_names=["a", "b", "z"])
    with pytest.raises(coloc.ColocError, match="no coloc_stats.json"):
        read_stats(str(tmp_path / "missing"))
    with pytest.raises(coloc.ColocError, match="not a weakloc statistics npz"):
        coloc.decode(json.loads((tmp_path / coloc.MANIFEST_FILE).read_text()), b"garbage")
    man = tmp_path / coloc.MANIFEST_FILE
    man.write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(coloc.ColocError, match="expected format"):
        read_stats(str(tmp_path))
    man.write_text("{not json")
    with pytest.raises(coloc.ColocError, match="not valid JSON"):
        read_stats(str(man))


def _two_images(rng, feature_grid, size):
    """Two images, each with the CAMs (3 x 4) of classes 1 and 0 in another order, features on `feature_grid`
    and class 1's component: (CamOutputs, CAMs, component, class 1's projection by the reference formula)."""
    from weakloc.models.cam import CamOutputs

    feats = rng.uniform(0, 2, size=(2, *feature_grid, 5)).astype(np.float32)
    low = rng.normal(size=(2, 2, 3, 4)).astype(np.float32)
    comp = coloc.principal_component(_unsigned(feats))
    out = CamOutputs(None, None, None, np.array([[1, 0], [0, 1]], np.int32), low, size, feats)
    return out, low, comp, np.einsum("bhwk,k->bhw", feats - comp.mean, comp.direction)


def test_colocalized_replaces_known_classes_and_keeps_cams_of_others(rng):
    from weakloc.models.cam import CamOutputs

    out, low, comp, expected = _two_images(rng, (3, 4), (6, 8))
    got, missing = coloc.colocalized(out, {1: comp}, "coloc")
    assert missing == 2 and got.features is None
    np.testing.assert_allclose(got.low_res[0, 0], expected[0], atol=1e-5)
    np.testing.assert_allclose(got.low_res[1, 1], expected[1], atol=1e-5)
    np.testing.assert_array_equal(got.low_res[0, 1], low[0, 1])
    np.testing.assert_array_equal(got.low_res[1, 0], low[1, 0])
    fused, _ = coloc.colocalized(out, {1: comp}, "fused", "mean")
    np.testing.assert_allclose(fused.low_res[0, 0], coloc.fuse(low[0, 0], expected[0]), atol=1e-6)
    with pytest.raises(ValueError, match="features=True"):
        coloc.colocalized(CamOutputs(None, None, None, out.cam_classes, low, (6, 8)), {1: comp})


def test_colocalized_on_a_finer_layer_puts_every_map_on_its_grid(rng):
    """Features of a layer twice as fine as the CAMs (--coloc_layer): projections at the features' grid, the
    CAMs of classes without a component resized onto it (bilinear, as cam.upsample), fused maps alike."""
    from weakloc.models.cam import upsample

    out, low, comp, expected = _two_images(rng, (6, 8), (12, 16))
    got, missing = coloc.colocalized(out, {1: comp}, "coloc")
    assert got.low_res.shape == (2, 2, 6, 8) and missing == 2
    np.testing.assert_allclose(got.low_res[0, 0], expected[0], atol=1e-5)
    np.testing.assert_allclose(got.low_res[0, 1], upsample(low[0, 1:2], (6, 8))[0], atol=1e-6)
    fused, _ = coloc.colocalized(out, {1: comp}, "fused", "product")
    np.testing.assert_allclose(fused.low_res[1, 1], coloc.fuse(upsample(low[1, 1:2], (6, 8))[0], expected[1],
                                                               "product"), atol=1e-6)
