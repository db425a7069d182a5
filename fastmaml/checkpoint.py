"""Model and checkpoint files: plain data, never pickles.

A file is a NumPy ``.npz`` archive of numeric arrays plus one entry,
``__meta__``, holding UTF-8 JSON (configuration, iteration, RNG states,
versions). It is read with ``allow_pickle=False``. Writes are atomic: a
temporary file in the same folder is written, flushed, fsynced and renamed
over the target, so a run killed at any moment leaves the previous complete
file intact. A new file gets the mode ``0o666`` less the umask (like
``open``); an existing file keeps its mode.

A saved model holds its history inline. A training checkpoint keeps the
history in an append-only sidecar, ``<checkpoint>.history-<token>`` (JSON
lines) beside it, so that writing a checkpoint costs the same at iteration 10
and at iteration 10 000: each write appends only the new records, then
replaces the ``.npz`` whose metadata records how many bytes of the sidecar
(and their CRC-32) belong to it. Bytes past that length (appended by a run
killed before its ``.npz`` was replaced) are ignored and truncated by the next
resume. Copy or move a checkpoint together with its sidecar.

Reading never trusts the file: every ``.npy`` member's header is read and
checked against the member's real size before any array is allocated, the
JSON metadata is bounded in size and nesting depth, and anything wrong is a
:class:`CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import threading
import zipfile
import zlib

import numpy as np
import numpy.lib.format as _npformat

__all__ = ["CheckpointError", "read", "write", "FORMAT", "FORMAT_VERSION"]

FORMAT = "fastmaml-model"
FORMAT_VERSION = 1
_META_KEY = "__meta__"
MAX_META_BYTES = 256 << 20  # the metadata JSON (a saved model's inline history included)
MAX_JSON_DEPTH = 64  # checkpoint metadata nests a few levels; this bounds the parser's recursion
_NUMERIC_KINDS = "biufc"
_SIDECAR = re.compile(r"^[A-Za-z0-9_.+-]{1,200}\.history-[0-9a-f]{8,64}$")


class CheckpointError(ValueError):
    """A model/checkpoint file that cannot be read: corrupt, truncated, foreign or too new."""


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------

_umask_lock = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:  # elsewhere the only portable way is to set it and put it back
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _file_mode(path: str) -> int:
    """The mode a (re)written ``path`` gets: an existing file's, else 0o666 less the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _fsync_folder(folder: str) -> None:
    try:  # make a rename or a creation itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # pragma: no cover - not all platforms allow it
        pass


def write_bytes_atomic(path, data) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename), keeping or umask-deriving its mode."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    # never create folders behind the user's back: a typo in a path would scatter files
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a folder; expected a file path such as {os.path.join(path, 'model.npz')}")
    mode = _file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), mode)  # mkstemp makes 0600 whatever the umask
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def write(path, arrays: dict, meta: dict) -> None:
    """Atomically write ``arrays`` (name -> ndarray) and ``meta`` (JSON-able dict) to ``path``."""
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
    write_bytes_atomic(path, buffer.getbuffer())


class HistoryLog:
    """The append-only history sidecar of a checkpoint (see the module docstring).

    ``records`` is the history list it mirrors: the first ``count`` records
    are on disk (``nbytes`` bytes with CRC-32 ``crc``).
    """

    def __init__(self, checkpoint_path, records: list, token: str | None = None, count=0, nbytes=0, crc=0):
        self.checkpoint_path = os.fspath(checkpoint_path)
        self.records = records
        self.token = token or os.urandom(8).hex()
        self.count, self.nbytes, self.crc = count, nbytes, crc

    @property
    def name(self) -> str:
        return f"{os.path.basename(self.checkpoint_path)}.history-{self.token}"

    @property
    def path(self) -> str:
        return os.path.join(os.path.dirname(os.path.abspath(self.checkpoint_path)), self.name)

    def flush(self) -> dict:
        """Append the records not yet on disk; return the metadata that pins this prefix."""
        new = b"".join(json.dumps(r).encode("utf-8") + b"\n" for r in self.records[self.count:])
        exists = os.path.exists(self.path)
        if not exists or new:
            mode = _file_mode(self.checkpoint_path)
            flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0)
            fd = os.open(self.path, flags, mode)
            try:
                # bytes past nbytes belong to no checkpoint (a run killed between append and rename)
                os.ftruncate(fd, self.nbytes)
                os.lseek(fd, self.nbytes, os.SEEK_SET)
                view = memoryview(new)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            if not exists:
                _fsync_folder(os.path.dirname(self.path))
        self.crc = zlib.crc32(new, self.crc)
        self.nbytes += len(new)
        self.count = len(self.records)
        return {"file": self.name, "records": self.count, "bytes": self.nbytes, "crc32": self.crc}


def remove_stale_sidecars(checkpoint_path, keep: str) -> None:
    """Delete the history sidecars of ``checkpoint_path`` other than ``keep`` (after a new run's first write)."""
    folder = os.path.dirname(os.path.abspath(os.fspath(checkpoint_path)))
    prefix = os.path.basename(os.fspath(checkpoint_path)) + ".history-"
    try:
        names = os.listdir(folder)
    except OSError:  # pragma: no cover
        return
    for name in names:
        if name.startswith(prefix) and name != keep and _SIDECAR.match(name):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:  # pragma: no cover - best effort: a stale sidecar is only disk space
                pass


def read_history(path, info) -> tuple[list, HistoryLog]:
    """The history records a checkpoint's metadata ``info`` pins in its sidecar, and the log to continue it."""
    path = os.fspath(path)
    if not isinstance(info, dict):
        raise CheckpointError(f"path: {path!r}: metadata 'history' is not a sidecar description")
    name, count, nbytes, crc = info.get("file"), info.get("records"), info.get("bytes"), info.get("crc32")
    if not isinstance(name, str) or not _SIDECAR.match(name):  # a bare file name: never a path elsewhere
        raise CheckpointError(f"path: {path!r}: metadata names an invalid history sidecar {name!r}")
    for key, value in (("records", count), ("bytes", nbytes), ("crc32", crc)):
        if not _is_int(value) or value < 0:
            raise CheckpointError(f"path: {path!r}: history sidecar field {key!r} is not a non-negative integer")
    side = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    try:
        with open(side, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < nbytes:
                raise CheckpointError(
                    f"path: {path!r}: history sidecar {side!r} is truncated ({size} bytes, expected {nbytes})"
                )
            data = fh.read(nbytes)
    except FileNotFoundError:
        raise CheckpointError(
            f"path: {path!r}: its history sidecar {side!r} is missing (copy a checkpoint together with it)"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"path: {path!r}: cannot read its history sidecar {side!r} ({exc})") from exc
    if zlib.crc32(data) != crc:
        raise CheckpointError(f"path: {path!r}: history sidecar {side!r} does not match the checkpoint (CRC-32)")
    if data and not data.endswith(b"\n"):
        raise CheckpointError(f"path: {path!r}: history sidecar {side!r} ends inside a record")
    _check_depth(data, f"path: {path!r}: history sidecar {side!r}")
    records = []
    for line in data.split(b"\n")[:-1]:
        record = _loads(line, f"path: {path!r}: history sidecar {side!r}", check=False)
        if not isinstance(record, dict):
            raise CheckpointError(f"path: {path!r}: history sidecar {side!r} holds a record that is not an object")
        records.append(record)
    if len(records) != count:
        raise CheckpointError(
            f"path: {path!r}: history sidecar {side!r} holds {len(records)} records, the checkpoint {count}"
        )
    token = name.rsplit(".history-", 1)[1]
    log = HistoryLog(path, records, token=token, count=count, nbytes=nbytes, crc=crc)
    return records, log


# --------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _check_depth(raw: bytes, what: str) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH (json.loads would recurse once per level)."""
    skeleton = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)  # brackets inside strings don't nest
    opens = (skeleton == ord("[")) | (skeleton == ord("{"))
    at = np.flatnonzero(opens | (skeleton == ord("]")) | (skeleton == ord("}")))
    if at.size > MAX_JSON_DEPTH:
        depth = int(np.cumsum(np.where(opens[at], 1, -1)).max())
        if depth > MAX_JSON_DEPTH:
            raise CheckpointError(f"{what}: JSON nested {depth} levels deep (the limit is {MAX_JSON_DEPTH})")


def _loads(raw: bytes, what: str, check: bool = True):
    """JSON from untrusted bytes: bounded size and nesting depth, every failure a CheckpointError."""
    if check:
        if len(raw) > MAX_META_BYTES:
            raise CheckpointError(f"{what}: JSON of {len(raw)} bytes exceeds the limit of {MAX_META_BYTES}")
        _check_depth(raw, what)
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{what}: invalid JSON metadata ({exc})") from None


def _member_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, what: str, archive_size: int, kinds: str):
    """(shape, fortran_order, dtype) of one ``.npy`` member, checked against the member's size."""
    if info.compress_size > archive_size or (
            info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size):
        raise CheckpointError(f"{what}: member {info.filename!r} declares a size the archive does not hold")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise CheckpointError(f"{what}: member {info.filename!r} uses an unsupported compression")
    if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > 1024 * info.compress_size + (1 << 20):
        raise CheckpointError(f"{what}: member {info.filename!r} declares an implausible expansion (a zip bomb?)")
    with zf.open(info) as fh:
        try:
            version = _npformat.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = _npformat.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = _npformat.read_array_header_2_0(fh)
            else:
                raise CheckpointError(f"{what}: member {info.filename!r} has .npy format version {version}")
            offset = fh.tell()
        except CheckpointError:
            raise
        except (ValueError, EOFError, OSError, zipfile.BadZipFile, SyntaxError, TypeError, OverflowError,
                MemoryError, RecursionError, zlib.error) as exc:
            raise CheckpointError(f"{what}: member {info.filename!r} has no valid .npy header ({exc})") from None
    if dtype.hasobject or dtype.kind not in kinds or dtype.fields is not None or dtype.subdtype is not None:
        raise CheckpointError(f"{what}: member {info.filename!r} has a dtype {dtype} that is not allowed here")
    count = 1
    for n in shape:
        count *= int(n)
    if count * dtype.itemsize != info.file_size - offset:
        raise CheckpointError(
            f"{what}: member {info.filename!r} declares shape {shape} of {dtype} "
            f"({count * dtype.itemsize} bytes) but holds {info.file_size - offset} bytes"
        )
    return tuple(int(n) for n in shape), fortran, dtype


def read_npz(path, what: str | None = None, error=CheckpointError, kinds: str = _NUMERIC_KINDS) -> dict:
    """Every array of an ``.npz`` file, each member's header checked before anything is allocated.

    Parameters
    ----------
    path : str or os.PathLike
    what : str, optional
        How messages name the file (default: ``path: '<path>'``).
    error : type
        The exception raised for a file that is not a valid ``.npz`` of
        numeric arrays (a :class:`ValueError` subclass).
    kinds : str
        The dtype kinds allowed (``numpy.dtype.kind`` letters); never objects.

    Returns
    -------
    dict
        Member name (without ``.npy``) -> ndarray, in archive order.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    error
        If the file is not a zip archive, is truncated, or a member is not a
        plain numeric ``.npy`` whose header matches its size.
    """
    path = os.fspath(path)
    what = what or f"path: {path!r}"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: no such file")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise error(f"{what}: cannot be read ({exc})") from exc
    try:
        zf = zipfile.ZipFile(io.BytesIO(raw))
    except Exception as exc:  # noqa: BLE001 - zipfile raises many kinds on hostile input; all mean "not an npz"
        raise error(f"{what}: corrupt, truncated or not an .npz archive ({type(exc).__name__}: {exc})") from None
    out = {}
    try:
        with zf:
            infos = zf.infolist()
            if len(infos) > 4096:
                raise CheckpointError(f"{what}: {len(infos)} members is not a fastmaml file")
            for info in infos:
                if not info.filename.endswith(".npy") or info.filename[:-4] in out:
                    raise CheckpointError(f"{what}: unexpected or repeated member {info.filename!r}")
                shape, _, dtype = _member_header(zf, info, what, len(raw), kinds)
                with zf.open(info) as fh:
                    arr = np.lib.format.read_array(fh, allow_pickle=False)
                if arr.shape != shape or arr.dtype != dtype:  # pragma: no cover - read_array agrees with the header
                    raise CheckpointError(f"{what}: member {info.filename!r} changed while it was read")
                out[info.filename[:-4]] = arr
    except CheckpointError as exc:
        if error is CheckpointError:
            raise
        raise error(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - as above; allocations were bounded by the header checks
        raise error(f"{what}: corrupt or truncated archive ({type(exc).__name__}: {exc})") from None
    return out


def read(path) -> tuple[dict, dict]:
    """Read a file written by :func:`write`; return (arrays, meta).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        If the file is not a fastmaml model/checkpoint, is corrupt or
        truncated, holds a member whose header disagrees with its size,
        holds metadata larger than ``MAX_META_BYTES`` or nested deeper than
        ``MAX_JSON_DEPTH``, or was written by a newer format version.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no such model/checkpoint file: {path!r}")
    arrays = read_npz(path, f"path: {path!r}")
    raw = arrays.pop(_META_KEY, None)
    if raw is None:
        raise CheckpointError(f"path: {path!r} is not a fastmaml model/checkpoint (no metadata)")
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"path: {path!r}: metadata is not a byte string")
    meta = _loads(raw.tobytes(), f"path: {path!r}")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"path: {path!r} is not a fastmaml model/checkpoint")
    version = meta.get("format_version")
    if not _is_int(version) or version < 1:
        raise CheckpointError(f"path: {path!r}: metadata format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"path: {path!r} was written in format version {version}, newer than this fastmaml "
            f"supports ({FORMAT_VERSION}); upgrade fastmaml to read it"
        )
    return arrays, meta
