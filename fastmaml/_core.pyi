"""Type stub of the compiled core (checked against the extension by mypy.stubtest in CI)."""

from typing import Any, Tuple

import numpy as np

__version__: str
build_type: str
compiler: str
reduce_block: int

class DivergenceError(FloatingPointError): ...

def meta_value_and_grad(
    theta: np.ndarray,
    inner_lr: object,
    lr_steps: int,
    lr_rows: int,
    lr_cols: int,
    log_scale: object,
    U: object,
    inner_steps: int,
    l2: float,
    mode: int,
    n_threads: int,
    n_classes: int,
    support_X: np.ndarray,
    support_idx: object,
    support_ptr: np.ndarray,
    support_y: np.ndarray,
    query_X: np.ndarray,
    query_idx: object,
    query_ptr: np.ndarray,
    query_y: np.ndarray,
    sweep: int = 0,
    block_sums: bool = False,
    kernel: object = None,
) -> Tuple[Any, ...]: ...
def adapt(
    theta: np.ndarray,
    per_task_theta: bool,
    inner_lr: object,
    log_scale: object,
    U: object,
    inner_steps: int,
    l2: float,
    keep_path: bool,
    n_threads: int,
    n_classes: int,
    X: np.ndarray,
    idx: object,
    ptr: np.ndarray,
    y: np.ndarray,
) -> np.ndarray: ...
def loss_grad_hvp(
    params: np.ndarray,
    v: object,
    l2: float,
    n_threads: int,
    n_classes: int,
    X: np.ndarray,
    idx: object,
    ptr: np.ndarray,
    y: np.ndarray,
) -> Tuple[np.ndarray, np.ndarray]: ...
def imaml_value_and_grad(
    theta: np.ndarray,
    mu: float,
    l2: float,
    tol: float,
    max_iter: int,
    cg_tol: float,
    cg_max_iter: int,
    n_threads: int,
    n_classes: int,
    support_X: np.ndarray,
    support_idx: object,
    support_ptr: np.ndarray,
    support_y: np.ndarray,
    query_X: np.ndarray,
    query_idx: object,
    query_ptr: np.ndarray,
    query_y: np.ndarray,
) -> Tuple[float, np.ndarray, dict]: ...
def sample_without_replacement(bit_generator_capsule: object, counts: np.ndarray, m: int) -> np.ndarray: ...
def openmp_enabled() -> bool: ...
def max_threads() -> int: ...
def multiversioned() -> bool: ...
def simd_level() -> str: ...
def uses_gram(n: int, d: int, n_classes: int, inner_steps: int, kernel: bool = False) -> bool: ...
