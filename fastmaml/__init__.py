"""fastmaml: exact, fast meta-learning of logistic-regression models across many small tasks."""

from __future__ import annotations

try:
    from . import _core
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "fastmaml's compiled extension fastmaml._core could not be imported. Did you build it? "
        "Install with `pip install .` (or `pip install -e .`) from the source tree rather than "
        "importing the checkout directly."
    ) from exc

from importlib.metadata import PackageNotFoundError, version as _version

from .functional import (
    REDUCE_BLOCK,
    BlockSums,
    combine_block_sums,
    meta_block_sums,
    ConvergenceWarning,
    ImplicitGradient,
    PreconditionedGradient,
    ReptileStep,
    adapt_preconditioned,
    imaml_value_and_grad,
    precond_value_and_grad,
    reptile_grad,
    DivergenceError,
    MetaGradient,
    adapt,
    hessian_vector_product,
    loss_and_grad,
    meta_value_and_grad,
    predict_proba,
)
from ._config import show_config
from ._tasks import Tasks
from .estimator import MAML, LogisticModel, StepSizeWarning
from .datasets import make_grouped_tasks
from .samplers import EpisodeSampler, GroupedSampler
from .splits import split_groups, split_rows

try:
    __version__ = _version("fastmaml")
except PackageNotFoundError:  # pragma: no cover
    __version__ = getattr(_core, "__version__", "0+unknown")

__all__ = [
    "REDUCE_BLOCK",
    "BlockSums",
    "combine_block_sums",
    "meta_block_sums",
    "ConvergenceWarning",
    "ImplicitGradient",
    "PreconditionedGradient",
    "ReptileStep",
    "adapt_preconditioned",
    "imaml_value_and_grad",
    "precond_value_and_grad",
    "reptile_grad",
    "DivergenceError",
    "MetaGradient",
    "MAML",
    "EpisodeSampler",
    "GroupedSampler",
    "make_grouped_tasks",
    "split_groups",
    "split_rows",
    "LogisticModel",
    "StepSizeWarning",
    "Tasks",
    "adapt",
    "hessian_vector_product",
    "loss_and_grad",
    "meta_value_and_grad",
    "predict_proba",
    "show_config",
    "__version__",
]
