"""Fuzzing the file readers: every input either reads or raises the documented error, naming the file.

* checkpoint reader (``MAML.load`` and ``fit(resume=True)``): truncated, bit-flipped and
  overwritten valid checkpoints and saved models, and random JSON metadata ->
  success or :class:`fastmaml.CheckpointError` (resume may also refuse other settings
  with a ``ValueError`` starting ``resume:``, or stop on ``DivergenceError`` for
  finite parameters so large that training diverges);
* IDX reader (``fastmaml.datasets.load_idx``): random headers, truncations, gzip
  (small bombs included) -> an array or ``ValueError`` naming the file;
* NPZ shard reader (``fastmaml.distributed.load_shard_npz``): mutated shards and
  random archives -> Tasks or ``ValueError`` naming the file.

Never another exception, a crash or a hang: each example runs under a watchdog
(``faulthandler.dump_traceback_later``) that aborts the process with a traceback
after ``FASTMAML_FUZZ_HANG_SECONDS`` (default 60).

Budget: ``FASTMAML_FUZZ_EXAMPLES`` examples per fuzzer (default 15: the normal
test run stays fast, and is deterministic). CI runs a longer, randomised pass::

    FASTMAML_FUZZ_EXAMPLES=1500 FASTMAML_FUZZ_RANDOM=1 \\
        pytest -q -p no:cacheprovider tests/test_fuzz.py
"""

from __future__ import annotations

import faulthandler
import gzip
import json
import os
import shutil
import struct
import zipfile

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmaml import MAML, DivergenceError, Tasks
from fastmaml.checkpoint import CheckpointError
from fastmaml.datasets import load_idx, make_grouped_tasks
from fastmaml.distributed import load_shard_npz, save_shards_npz
from fastmaml.samplers import GroupedSampler

EXAMPLES = int(os.environ.get("FASTMAML_FUZZ_EXAMPLES", "15"))
HANG_SECONDS = float(os.environ.get("FASTMAML_FUZZ_HANG_SECONDS", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # the machine is shared: hangs are caught by the watchdog, not by timing examples
    derandomize=not os.environ.get("FASTMAML_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


@pytest.fixture(autouse=True)
def watchdog():
    faulthandler.dump_traceback_later(HANG_SECONDS * max(1, EXAMPLES), exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


# --------------------------------------------------------------------------- mutations


@st.composite
def mutated(draw, data: bytes):
    """``data`` truncated, bit-flipped, overwritten or spliced (a few edits)."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "delete"]))
        if not out:
            break
        pos = draw(st.integers(0, len(out) - 1))
        if kind == "flip":
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            out[pos:pos + len(chunk)] = chunk
        elif kind == "truncate":
            del out[pos:]
        elif kind == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del out[pos:pos + draw(st.integers(1, 64))]
    return bytes(out)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-ckpt")
    X, y, groups = make_grouped_tasks(n_groups=12, n_per_group=12, n_features=3, random_state=0)
    kw = dict(inner_steps=2, inner_lr=0.3, meta_batch_size=4, n_iterations=4, progress=False,
              learn_inner_lr="scalar", l2=0.01, learn_l2=True, checkpoint_every=2)
    ckpt = folder / "ckpt.npz"
    fitted = MAML(checkpoint_path=str(ckpt), **kw).fit(GroupedSampler(X, y, groups, support_size=4, random_state=1))
    fitted.save(folder / "model.npz")
    sidecar = next(folder.glob("ckpt.npz.history-*"))
    return {"folder": folder, "table": (X, y, groups), "kw": kw, "sidecar": sidecar,
            "ckpt": ckpt.read_bytes(), "model": (folder / "model.npz").read_bytes()}


def _place(valid_files, tmp_path, name, data):
    """Write ``data`` as ``name`` in a fresh folder, with the checkpoint's sidecar beside it."""
    target = tmp_path / name
    target.write_bytes(data)
    shutil.copy(valid_files["sidecar"], tmp_path / valid_files["sidecar"].name.replace("ckpt.npz", name))
    return target


def _load_or_checkpoint_error(path):
    try:
        MAML.load(path)
    except CheckpointError as exc:
        assert os.path.basename(path) in str(exc)


def _resume_or_documented_error(valid_files, path):
    X, y, groups = valid_files["table"]
    kw = dict(valid_files["kw"], n_iterations=5, checkpoint_path=str(path))
    try:
        MAML(**kw).fit(GroupedSampler(X, y, groups, support_size=4, random_state=1), resume=True)
    except CheckpointError as exc:
        assert os.path.basename(path) in str(exc)
    except DivergenceError:
        pass  # finite parameters edited to values so large that the inner loop overflows
    except ValueError as exc:  # a mutated configuration that differs from this model's
        assert str(exc).startswith("resume:"), exc


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_checkpoints_load_or_raise_checkpoint_error(valid_files, tmp_path_factory, data):
    which = data.draw(st.sampled_from(["ckpt", "model"]))
    blob = data.draw(mutated(valid_files[which]))
    folder = tmp_path_factory.mktemp("case")
    path = _place(valid_files, folder, "case.npz", blob)
    _load_or_checkpoint_error(path)
    if which == "ckpt":
        _resume_or_documented_error(valid_files, path)


def _replace_meta(blob: bytes, meta_bytes: bytes, path):
    import io

    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "__meta__"}
    arrays["__meta__"] = np.frombuffer(meta_bytes, dtype=np.uint8)
    np.savez(path, **arrays)


@FUZZ
@given(data=st.data())
def test_fuzz_random_metadata_loads_or_raises_checkpoint_error(valid_files, tmp_path_factory, data):
    import io

    which = data.draw(st.sampled_from(["ckpt", "model"]))
    with np.load(io.BytesIO(valid_files[which]), allow_pickle=False) as z:
        meta = json.loads(bytes(z["__meta__"]).decode())
    how = data.draw(st.sampled_from(["field", "config", "whole", "bytes"]))
    if how == "field":
        meta[data.draw(st.sampled_from(sorted(meta)))] = data.draw(json_values)
    elif how == "config":
        meta["config"][data.draw(st.sampled_from(sorted(meta["config"])))] = data.draw(json_values)
    elif how == "whole":
        meta = data.draw(json_values)
    raw = data.draw(mutated(json.dumps(meta).encode())) if how == "bytes" else json.dumps(meta).encode()
    folder = tmp_path_factory.mktemp("case")
    path = _place(valid_files, folder, "case.npz", b"")
    _replace_meta(valid_files[which], raw, path)
    _load_or_checkpoint_error(path)
    if which == "ckpt":
        _resume_or_documented_error(valid_files, path)


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_history_sidecar(valid_files, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("case")
    path = _place(valid_files, folder, "case.npz", valid_files["ckpt"])
    sidecar = next(folder.glob("case.npz.history-*"))
    sidecar.write_bytes(data.draw(mutated(sidecar.read_bytes())))
    _load_or_checkpoint_error(path)


# --------------------------------------------------------------------------- IDX


def _idx(code, shape, payload):
    return bytes([0, 0, code, len(shape)]) + b"".join(struct.pack(">I", n) for n in shape) + payload


idx_files = st.one_of(
    st.binary(max_size=64),
    st.builds(
        _idx,
        st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0xFF]),
        st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 6), min_size=0, max_size=5),
        st.binary(max_size=256),
    ),
)


def _expect_array_or_value_error(path):
    try:
        arr = load_idx(path)
    except (ValueError, MemoryError) as exc:  # MemoryError: a header larger than memory, decided before reading
        assert os.path.basename(path) in str(exc), exc
    else:
        assert isinstance(arr, np.ndarray)


@FUZZ
@given(data=st.data())
def test_fuzz_idx_reader(tmp_path_factory, data):
    blob = data.draw(idx_files)
    if data.draw(st.booleans()):
        blob = data.draw(mutated(blob)) if blob else blob
    how = data.draw(st.sampled_from(["plain", "gzip", "gzip-truncated", "bomb"]))
    if how == "gzip":
        blob = gzip.compress(blob)
    elif how == "gzip-truncated":
        packed = gzip.compress(blob)
        blob = packed[: data.draw(st.integers(0, len(packed)))]
    elif how == "bomb":  # a small file that expands to a few MiB past its header
        blob = gzip.compress(_idx(0x08, (2, 2), b"\0" * data.draw(st.integers(4, 4 << 20))))
    path = tmp_path_factory.mktemp("idx") / "case-idx1-ubyte"
    path.write_bytes(blob)
    _expect_array_or_value_error(path)


# --------------------------------------------------------------------------- NPZ shards


@pytest.fixture(scope="module")
def valid_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-shards")
    rng = np.random.default_rng(0)
    dense = Tasks(rng.random((64, 3, 2)), rng.integers(0, 2, (64, 3)), rng.random((64, 3, 2)),
                  rng.integers(0, 2, (64, 3)))
    X = rng.random((20, 2))
    index = Tasks.from_index(X, rng.integers(0, 20, 128), rng.integers(0, 2, 128), rng.integers(0, 20, 128),
                             rng.integers(0, 2, 128), support_ptr=np.arange(0, 129, 2), query_ptr=np.arange(0, 129, 2))
    paths = save_shards_npz(dense, folder / "dense", shard_size=64)
    paths += save_shards_npz(index, folder / "index", shard_size=64)
    return [open_bytes(p) for p in paths]


def open_bytes(path):
    with open(path, "rb") as fh:
        return fh.read()


def _shard_or_value_error(path):
    try:
        tasks = load_shard_npz(path)
    except ValueError as exc:
        assert os.path.basename(path) in str(exc), exc
    else:
        assert isinstance(tasks, Tasks)


@FUZZ
@given(data=st.data())
def test_fuzz_npz_shard_reader(valid_shards, tmp_path_factory, data):
    path = tmp_path_factory.mktemp("shard") / "shard-00000.npz"
    if data.draw(st.booleans()):
        path.write_bytes(data.draw(mutated(data.draw(st.sampled_from(valid_shards)))))
    else:  # an archive of random small arrays under the shard's names
        names = ["fastmaml_shard_version", "format", "support_X", "support_y", "query_X", "query_y", "X",
                 "support_idx", "query_idx", "support_ptr", "query_ptr", "kernel"]
        arrays = {}
        for name in data.draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names))):
            if name == "fastmaml_shard_version" and data.draw(st.booleans()):
                arrays[name] = np.array(1)  # a valid version and format reach the task checks
                continue
            if name == "format" and data.draw(st.booleans()):
                arrays[name] = np.array(data.draw(st.sampled_from(["dense", "index"])))
                continue
            kind = data.draw(st.sampled_from(["int", "float", "str"]))
            shape = tuple(data.draw(st.lists(st.integers(0, 4), max_size=3)))
            if kind == "str":
                arrays[name] = np.array(data.draw(st.sampled_from(["dense", "index", "x"])))
            elif kind == "int":
                arrays[name] = np.asarray(data.draw(st.integers(-3, 130)) * np.ones(shape, dtype=np.int64))
            else:
                arrays[name] = np.full(shape, data.draw(st.floats(allow_nan=True)))
        with zipfile.ZipFile(path, "w") as zf:
            import io

            for name, arr in arrays.items():
                buf = io.BytesIO()
                np.save(buf, arr)
                zf.writestr(name + ".npy", buf.getvalue())
    _shard_or_value_error(path)
