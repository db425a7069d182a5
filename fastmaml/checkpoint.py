"""Model and checkpoint files: plain data, never pickles.

A file is a NumPy ``.npz`` archive of numeric arrays plus one entry,
``__meta__``, holding UTF-8 JSON (configuration, iteration, RNG states,
history, versions). It is read with ``allow_pickle=False``. Writes are
atomic: a temporary file in the same folder is written, flushed, fsynced and
renamed over the target, so a run killed at any moment leaves the previous
complete file intact.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile

import numpy as np

__all__ = ["CheckpointError", "read", "write", "FORMAT", "FORMAT_VERSION"]

FORMAT = "fastmaml-model"
FORMAT_VERSION = 1
_META_KEY = "__meta__"


class CheckpointError(ValueError):
    """A model/checkpoint file that cannot be read: corrupt, truncated, foreign or too new."""


def write(path, arrays: dict, meta: dict) -> None:
    """Atomically write ``arrays`` (name -> ndarray) and ``meta`` (JSON-able dict) to ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    header = dict(meta)
    header["format"] = FORMAT
    header["format_version"] = FORMAT_VERSION
    payload = {k: np.asarray(v, order="C") for k, v in arrays.items()}  # keeps 0-d arrays 0-d
    for name, value in payload.items():
        if value.dtype == object:
            raise TypeError(f"checkpoint array {name!r} has object dtype; only numeric arrays are stored")
    payload[_META_KEY] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **payload)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buffer.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # pragma: no cover - not all platforms allow it
        pass


def read(path) -> tuple[dict, dict]:
    """Read a file written by :func:`write`; return (arrays, meta).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        If the file is not a fastmaml model/checkpoint, is corrupt or
        truncated, or was written by a newer format version.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no such model/checkpoint file: {path!r}")
    try:
        with open(path, "rb") as fh:
            raw = io.BytesIO(fh.read())  # the file is closed whatever np.load makes of it
        with np.load(raw, allow_pickle=False) as data:
            if _META_KEY not in data.files:
                raise CheckpointError(f"path: {path!r} is not a fastmaml model/checkpoint (no metadata)")
            arrays = {k: data[k] for k in data.files if k != _META_KEY}
            meta = json.loads(bytes(data[_META_KEY]).decode("utf-8"))
    except CheckpointError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, UnicodeDecodeError, KeyError) as exc:
        raise CheckpointError(f"path: {path!r} is corrupt, truncated or not a fastmaml file ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"path: {path!r} is not a fastmaml model/checkpoint")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"path: {path!r} was written in format version {version}, newer than this fastmaml "
            f"supports ({FORMAT_VERSION}); upgrade fastmaml to read it"
        )
    return arrays, meta
