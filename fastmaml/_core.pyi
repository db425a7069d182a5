"""Type stub of the compiled core (checked against the extension by mypy.stubtest in CI)."""

from typing import Any, ClassVar, Dict, List, Optional, Tuple

import numpy as np

__version__: str
build_type: str
compiler: str
reduce_block: int

class DivergenceError(FloatingPointError): ...
class ForkWarning(RuntimeWarning): ...

class Mode:
    """What the reverse sweep computes: exact MAML, first-order MAML or Reptile."""

    __members__: ClassVar[Dict[str, Mode]]
    maml: ClassVar[Mode]
    first_order: ClassVar[Mode]
    reptile: ClassVar[Mode]
    def __init__(self, value: int) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...
    def __index__(self) -> int: ...
    def __int__(self) -> int: ...
    def __ne__(self, other: object) -> bool: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

class Sweep:
    """Which exact path computes a meta-gradient (auto: the cost model decides)."""

    __members__: ClassVar[Dict[str, Sweep]]
    auto: ClassVar[Sweep]
    plain: ClassVar[Sweep]
    gram: ClassVar[Sweep]
    def __init__(self, value: int) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...
    def __index__(self) -> int: ...
    def __int__(self) -> int: ...
    def __ne__(self, other: object) -> bool: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

class Side:
    """One side (support or query) of a meta-batch: rows, indices, offsets, labels."""

    def __init__(self, X: np.ndarray, idx: object, ptr: np.ndarray, y: np.ndarray) -> None: ...
    @property
    def X(self) -> np.ndarray: ...
    @property
    def idx(self) -> Any: ...
    @property
    def ptr(self) -> np.ndarray: ...
    @property
    def y(self) -> np.ndarray: ...

def meta_value_and_grad(
    theta: np.ndarray,
    support: Side,
    query: Side,
    *,
    n_classes: int,
    inner_steps: int,
    l2: float,
    mode: Mode,
    sweep: Sweep,
    n_threads: int,
    inner_lr: object = None,
    lr_layout: Tuple[int, int, int] = (1, 1, 1),
    log_scale: object = None,
    U: object = None,
    kernel: object = None,
    block_sums: bool = False,
    task_lr: bool = False,
    l2_per_task: object = None,
    grad_features: bool = False,
    ext_generic: bool = False,
) -> Tuple[Any, ...]: ...
def adapt(
    theta: np.ndarray,
    support: Side,
    *,
    n_classes: int,
    inner_steps: int,
    l2: float,
    keep_path: bool,
    n_threads: int,
    inner_lr: object = None,
    log_scale: object = None,
    U: object = None,
) -> np.ndarray: ...
def loss_grad_hvp(
    params: np.ndarray,
    support: Side,
    *,
    n_classes: int,
    l2: float,
    n_threads: int,
    v: object = None,
) -> Tuple[np.ndarray, np.ndarray]: ...
def imaml_value_and_grad(
    theta: np.ndarray,
    support: Side,
    query: Side,
    *,
    n_classes: int,
    mu: float,
    l2: float,
    tol: float,
    max_iter: int,
    cg_tol: float,
    cg_max_iter: int,
    n_threads: int,
) -> Tuple[float, np.ndarray, dict]: ...
def choose_sweep(
    support_rows: int,
    n_tasks: int,
    n_features: int,
    n_classes: int,
    inner_steps: int,
    *,
    lr_layout: Tuple[int, int, int] = (1, 1, 1),
    preconditioned: bool = False,
    mode: Mode = ...,
    kernel: bool = False,
    requested: Sweep = ...,
) -> Sweep: ...
def extended_path(
    n_classes: int, inner_steps: int, lr_layout: Tuple[int, int, int] = (1, 1, 1), mode: Mode = ...
) -> str: ...
def uses_gram(n: int, d: int, n_classes: int, inner_steps: int, kernel: bool = False) -> bool: ...
def sample_without_replacement(bit_generator_capsule: object, counts: np.ndarray, m: int) -> np.ndarray: ...
def train_block(
    params: Dict[str, np.ndarray],
    m: Dict[str, np.ndarray],
    v: Dict[str, np.ndarray],
    *,
    fixed_lr: np.ndarray,
    lr_extent: Tuple[int, int, int],
    l2: float,
    learn_init: bool,
    n_classes: int,
    inner_steps: int,
    mode: Mode,
    optimizer: Tuple[Any, ...],
    t: int,
    n_iterations: int,
    records: np.ndarray,
    progress: np.ndarray,
    n_threads: int,
    batch_size: int = 0,
    support: Optional[Side] = None,
    query: Optional[Side] = None,
    kernel: object = None,
    episode: object = None,
    grouped: object = None,
    bit_generator: object = None,
    should_stop: object = None,
    last_draw: np.ndarray = ...,
) -> int: ...
def step_sizes(
    params: Dict[str, np.ndarray],
    *,
    fixed_lr: np.ndarray,
    lr_extent: Tuple[int, int, int],
    l2: float,
    n_classes: int,
    inner_steps: int,
) -> Tuple[np.ndarray, float]: ...
def apply_step(
    params: Dict[str, np.ndarray],
    m: Dict[str, np.ndarray],
    v: Dict[str, np.ndarray],
    *,
    fixed_lr: np.ndarray,
    lr_extent: Tuple[int, int, int],
    l2: float,
    learn_init: bool,
    n_classes: int,
    inner_steps: int,
    optimizer: Tuple[Any, ...],
    t: int,
    loss: float,
    grad: np.ndarray,
    hyper: np.ndarray,
    grad_l2: float,
) -> Tuple[int, float, float, float, float]: ...
def optimizer_step(
    values: List[np.ndarray],
    grads: List[np.ndarray],
    m: List[np.ndarray],
    v: List[np.ndarray],
    optimizer: Tuple[Any, ...],
    t: int,
) -> int: ...
def scheduled_lr(optimizer: Tuple[Any, ...], t: int) -> float: ...
def all_finite(a: Any) -> Optional[bool]: ...
def openmp_enabled() -> bool: ...
def max_threads() -> int: ...
def multiversioned() -> bool: ...
def portable_fallbacks() -> bool: ...
def simd_level() -> str: ...
