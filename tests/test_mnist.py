"""The cluttered-MNIST builder: IDX reading against hand-made files, canvas geometry, the true box, the split."""
import gzip
import struct

import numpy as np
import pytest

from weakloc.models import mnist
from tests.helpers import shared_path


def _write_idx(path, arr, magic, compress):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_images_and_labels(tmp_path, compress):
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs, 2051, compress)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([7, 1]), 2049, compress)
    x, y = mnist.load_idx_dir(str(tmp_path))
    assert x.shape == (2, 3, 4) and x[1, 2, 3] == 23 and y.tolist() == [7, 1]


def test_read_idx_refuses_bad_magic_and_short_body(tmp_path):
    (tmp_path / "bad").write_bytes(struct.pack(">II", 1234, 1))
    with pytest.raises(mnist.MnistError, match="magic number 1234"):
        mnist.read_idx(str(tmp_path / "bad"))
    (tmp_path / "short").write_bytes(struct.pack(">II", 2049, 5) + b"\x01\x02")
    with pytest.raises(mnist.MnistError, match="announces 5 bytes"):
        mnist.read_idx(str(tmp_path / "short"))


def test_true_box_is_the_tight_box_of_the_digit_ink():
    # A "digit" that is a solid 28x28 block: resized to s x s it covers exactly its paste square, so without
    # clutter or noise the canvas's ink is that square and the box must be its exact extent with side s.
    digits = np.full((3, 28, 28), 255, np.uint8)
    data, _ = mnist.make_cluttered(digits, np.array([0, 1, 2]), 30, fragments=(0, 0), noise=0.0, seed=3)
    for img, box in zip(data.images, data.boxes):
        ys, xs = np.nonzero(img[..., 0] > 0)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert 20 <= box[2] - box[0] <= 40 and box[2] - box[0] == box[3] - box[1]
        assert 0 <= box[0] and box[2] <= 96 and 0 <= box[1] and box[3] <= 96


def test_per_class_balanced_and_labels_follow_the_pool():
    digits = np.zeros((40, 28, 28), np.uint8)
    digits[:, 10:18, 10:18] = 200
    labels = np.arange(40) % 10
    data, picks = mnist.make_cluttered(digits, labels, 0, per_class=3, seed=1)
    assert len(data.labels) == 30 and np.bincount(data.labels).tolist() == [3] * 10
    assert data.labels.tolist() == labels[picks].tolist()
    assert data.images.shape == (30, 96, 96, 3) and data.images.dtype == np.uint8


def test_real_mnist_test_set_loads():
    x, y = mnist.load_idx_dir(str(shared_path("mnist")))
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    # The official test set: 980 zeros and 1135 ones (LeCun et al.'s published class counts).
    assert np.bincount(y)[:2].tolist() == [980, 1135]
    assert y[:5].tolist() == [7, 2, 1, 0, 4]


def test_offline_keras_download_becomes_a_clear_error(monkeypatch):
    import keras

    def fail():
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", fail)
    with pytest.raises(mnist.MnistError, match="--idx_dir"):
        mnist.load_keras_mnist()
