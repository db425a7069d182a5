"""Build and runtime configuration, for bug reports."""

from __future__ import annotations

import os
import platform
import sys
import warnings

import numpy as np

from . import _core


def config() -> dict:
    """Return the build and runtime configuration as a dict."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("fastmaml")
    except PackageNotFoundError:  # pragma: no cover
        ver = getattr(_core, "__version__", "unknown")
    return {
        "fastmaml": ver,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": np.__version__,
        "openmp": bool(_core.openmp_enabled()),
        "simd": _core.simd_level(),
        "build_type": _core.build_type,
        "compiler": _core.compiler,
        "max_threads": int(_core.max_threads()),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "reduce_block": int(_core.reduce_block),
    }


def show_config() -> None:
    """Print version, OpenMP support, threads, SIMD level, build type and platform (for bug reports)."""
    for key, value in config().items():
        print(f"{key:>16}: {value}")


if not _core.openmp_enabled():  # pragma: no cover - depends on the build
    warnings.warn(
        "fastmaml was built without OpenMP: tasks run serially and n_threads is ignored.",
        RuntimeWarning,
        stacklevel=2,
    )
