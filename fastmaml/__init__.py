"""fastmaml: exact, fast meta-learning of logistic-regression models across many small tasks."""

import os as _os

try:
    from . import _core
except ImportError as exc:  # pragma: no cover - only without a build
    _cause = exc.__cause__ or exc.__context__
    if isinstance(_cause, KeyboardInterrupt):  # Ctrl-C while the extension loaded: not a broken install
        raise KeyboardInterrupt from None
    _here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.isfile(_os.path.join(_here, _os.pardir, "pyproject.toml")):
        # the usual cause: Python started in the checkout, whose fastmaml/ folder (no compiled extension)
        # comes first on sys.path and hides the installed package
        raise ImportError(
            f"fastmaml was imported from the source tree {_here}, which has no compiled extension "
            "fastmaml._core: the current folder (or sys.path) holds the checkout, and its fastmaml/ folder "
            "shadows any installed fastmaml. Run Python from another folder (cd elsewhere), after installing "
            "with pip install . if you have not yet. "
            f"(Underlying error: {exc})"
        ) from exc
    raise ImportError(
        "fastmaml's compiled extension fastmaml._core could not be imported "
        f"({exc}); reinstall with pip install fastmaml (or pip install . from a source tree)."
    ) from exc

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError, version as _version

from .functional import (
    REDUCE_BLOCK,
    BlockSums,
    accumulate_feature_grads,
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
    ForkWarning,
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
from .policy import HyperPolicy
from .datasets import RaggedFamily, make_grouped_tasks, make_ragged_family
from .samplers import EpisodeSampler, GroupedSampler
from .splits import split_groups, split_rows

try:
    __version__ = _version("fastmaml")
except _PackageNotFoundError:  # pragma: no cover
    __version__ = getattr(_core, "__version__", "0+unknown")

__all__ = [
    "REDUCE_BLOCK",
    "BlockSums",
    "accumulate_feature_grads",
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
    "ForkWarning",
    "MetaGradient",
    "MAML",
    "HyperPolicy",
    "EpisodeSampler",
    "GroupedSampler",
    "make_grouped_tasks",
    "make_ragged_family",
    "RaggedFamily",
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
