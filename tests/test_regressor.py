"""The box regressor (models/regressor.py): it recovers a known linear map, pools as a hand computation says,
keeps the confident pseudo-boxes, and survives a save/load round trip."""
import numpy as np
import pytest

from weakloc.models import regressor


def _linear_data(n, seed=0, k=6, noise=0.0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, 4, 4, k)).astype(np.float32)
    gap = feats.mean(axis=(1, 2))
    a = rng.normal(scale=0.05, size=(k, 4))
    b = np.array([0.2, 0.25, 0.7, 0.75])
    boxes = gap @ a + b + rng.normal(scale=noise, size=(n, 4))
    return feats, boxes, a, b


def test_recovers_a_known_linear_map_from_gap_features():
    feats, boxes, a, b = _linear_data(400)
    reg = regressor.fit(regressor.descriptors(feats), boxes)
    test_feats, _, _, _ = _linear_data(50, seed=1)
    # The map of the training data (its a and b), applied to unseen features: the independent expectation.
    expected = test_feats.mean(axis=(1, 2)) @ a + b
    np.testing.assert_allclose(reg.boxes(test_feats), expected, atol=5e-3)
    # In original units the weights are a: weights / scale.
    np.testing.assert_allclose(reg.weights / reg.scale[:, None], a, atol=5e-3)


def test_noisy_targets_choose_a_larger_penalty_than_clean_ones():
    feats, clean, _, _ = _linear_data(200)
    _, noisy, _, _ = _linear_data(200, noise=0.3)
    d = regressor.descriptors(feats)
    assert regressor.fit(d, noisy).alpha > regressor.fit(d, clean).alpha


def test_descriptors_pool_a_grid_by_hand():
    f = np.arange(6 * 6 * 2, dtype=np.float32).reshape(1, 6, 6, 2)
    got = regressor.descriptors(f, grid=3).reshape(3, 3, 2)
    for i in range(3):
        for j in range(3):
            np.testing.assert_allclose(got[i, j], f[0, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(0, 1)))
    np.testing.assert_allclose(regressor.descriptors(f, grid=1)[0], f[0].mean(axis=(0, 1)))
    with pytest.raises(ValueError, match="at least that size"):
        regressor.descriptors(f[:, :2, :2], grid=3)


def test_predictions_are_ordered_and_clipped():
    feats, boxes, _, _ = _linear_data(100)
    reg = regressor.fit(regressor.descriptors(feats), boxes)
    flipped = regressor.BoxRegressor(reg.mean, reg.scale, -reg.weights * 50, np.array([0.9, 0.9, 0.1, 0.1],
                                     np.float32), samples=reg.samples)
    out = flipped.boxes(feats)
    assert (out >= 0).all() and (out <= 1).all()
    assert (out[:, 0] <= out[:, 2]).all() and (out[:, 1] <= out[:, 3]).all()


def test_confident_keeps_maps_above_both_quantiles():
    top = np.array([0.9, 0.8, 0.2, 0.95, 0.1])
    box = np.array([0.9, 0.1, 0.9, 0.8, 0.95])
    has = np.array([True, True, True, True, False])
    # Medians over the four boxed maps: top 0.85, box 0.85 -> only map 0 and map 3 (0.8 < 0.85 fails) ... by hand:
    # top >= 0.85: maps 0, 3; box >= 0.85: maps 0, 2. Both: map 0.
    np.testing.assert_array_equal(regressor.confident(top, box, has, 0.5), [True, False, False, False, False])
    np.testing.assert_array_equal(regressor.confident(top, box, has, 0.0), has)


def test_too_few_samples_is_a_clear_error():
    feats, boxes, _, _ = _linear_data(5)
    with pytest.raises(regressor.RegressorError, match="at least 8"):
        regressor.fit(regressor.descriptors(feats), boxes)


def test_save_load_round_trip_predicts_the_same():
    feats, boxes, _, _ = _linear_data(60)
    reg = regressor.fit(regressor.descriptors(feats, 2), boxes, grid=2)
    back = regressor.BoxRegressor.from_bytes(reg.to_bytes())
    assert (back.grid, back.alpha, back.samples) == (2, reg.alpha, 60)
    np.testing.assert_array_equal(back.boxes(feats), reg.boxes(feats))
    with pytest.raises(regressor.RegressorError, match="not an npz"):
        regressor.BoxRegressor.from_bytes(b"nonsense")
    with pytest.raises(regressor.RegressorError, match="other features"):
        back.predict(np.zeros((1, 3)))
