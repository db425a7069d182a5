"""Randomness shared by the samplers, splits and synthetic data.

* :func:`check_random_state` -- ``random_state`` (None, an int seed, a
  SeedSequence/BitGenerator or a Generator) to a :class:`numpy.random.Generator`;
* :func:`get_rng_state` / :func:`set_rng_state` -- a Generator's bit generator
  state as a JSON-serialisable dict and back, so that a checkpoint resumes the
  exact same stream;
* :func:`sample_without_replacement` -- many independent ordered samples
  without replacement in one call of the compiled core, driven by the
  Generator's own bit generator.

The stream of a seed depends only on the seed and the arguments (not on the
platform), but may change between NumPy or fastmaml versions.
"""

from __future__ import annotations

import numbers
from typing import Union

import numpy as np

from . import _core

RandomState = Union[None, int, np.random.Generator]


def check_random_state(random_state, name: str = "random_state") -> np.random.Generator:
    """None, an int seed, a SeedSequence/BitGenerator or a Generator -> Generator."""
    if isinstance(random_state, np.random.Generator):
        return random_state
    if random_state is None or isinstance(random_state, (np.random.SeedSequence, np.random.BitGenerator)):
        return np.random.default_rng(random_state)
    if isinstance(random_state, bool) or not isinstance(random_state, numbers.Integral):
        raise TypeError(
            f"{name}: expected None, an integer seed or a numpy.random.Generator, got {type(random_state).__name__}"
        )
    if random_state < 0:
        raise ValueError(f"{name}: expected a non-negative integer seed, got {random_state}")
    return np.random.default_rng(int(random_state))


def _to_json(value):
    """Bit generator state -> plain Python (dicts, lists, ints, str)."""
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer):
        return int(value)
    return value


def _from_json(value, template):
    """Inverse of :func:`_to_json`: lists become arrays where the template has arrays."""
    if isinstance(template, dict):
        if not isinstance(value, dict):
            raise ValueError("state: not a bit generator state (expected a dict)")
        return {k: _from_json(value[k], template[k]) if k in template else value[k] for k in value}
    if isinstance(template, np.ndarray):
        return np.asarray(value, dtype=template.dtype)
    return value


def get_rng_state(rng: np.random.Generator) -> dict:
    """The bit generator state of ``rng`` as plain, JSON-serialisable Python."""
    return _to_json(rng.bit_generator.state)


def set_rng_state(rng: np.random.Generator, state) -> np.random.Generator:
    """Restore `state` into `rng` (same bit generator) or a new Generator."""
    if not isinstance(state, dict) or "bit_generator" not in state:
        raise ValueError("state: expected a dict from get_state() with a 'bit_generator' entry")
    name = state["bit_generator"]
    if name != type(rng.bit_generator).__name__:
        bg_cls = getattr(np.random, str(name), None)
        if not (isinstance(bg_cls, type) and issubclass(bg_cls, np.random.BitGenerator)):
            raise ValueError(f"state: unknown bit generator {name!r}")
        rng = np.random.Generator(bg_cls())
    template = rng.bit_generator.state
    try:
        rng.bit_generator.state = _from_json(state, template)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"state: not a valid {name} state ({exc})") from exc
    return rng


def sample_without_replacement(rng: np.random.Generator, n: np.ndarray, m: int) -> np.ndarray:
    """Independent uniformly random ordered samples without replacement.

    Parameters
    ----------
    rng : numpy.random.Generator
        Its bit generator drives the draws (and is advanced, under its lock).
    n : ndarray of int, shape (n_samples,)
        Population size of each row; all ``n >= m``.
    m : int
        Sample size.

    Returns
    -------
    ndarray of int64, shape (n_samples, m)
        Row s holds m distinct positions in ``[0, n[s])``, every ordered
        m-subset equally likely, rows independent.

    Notes
    -----
    The compiled core samples (Floyd's algorithm then a Fisher-Yates shuffle,
    unbiased bounded integers): microseconds for a meta-batch, and the stream
    is a function of the Generator's state alone.
    """
    n = np.ascontiguousarray(n, dtype=np.int64)
    if n.shape[0] == 0 or m == 0:
        return np.zeros((n.shape[0], m), dtype=np.int64)
    bitgen = rng.bit_generator
    with bitgen.lock:
        return _core.sample_without_replacement(bitgen.capsule, n, int(m))
