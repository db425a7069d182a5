"""A learned representation on the digit-pair experiment: ``fastmaml demo --backbone cnn``.

The pixel demo (:mod:`fastmaml.demo`) shows that an initialization of a
logistic regression on raw pixels cannot transfer much to an unseen digit
pair: the tasks relabel their classes at random, so no start is better than
zero. A *representation* learned across tasks can transfer. This module
meta-trains a small convolutional feature extractor in PyTorch and compares,
on the same 2-vs-3 test episodes at K = 1, 5, 10 examples per class:

(a) pixels + zero start: :func:`fastmaml.adapt` from zero on raw pixels, the
    step size chosen on meta-validation (the pixel demo's best);
(b) a pre-trained embedding: the same backbone trained by ordinary
    multi-class classification on the meta-training digits, then
    scikit-learn's ``LogisticRegression`` fitted per task on the L2-normalised
    features (C chosen on meta-validation) -- the standard strong baseline;
(c) ANIL through fastmaml's head: the head adapts in the inner loop
    (:func:`fastmaml.torch.meta_loss`, exact second-order gradients), the
    backbone learns from the outer loss;
(d) the same ANIL with the head unrolled in plain torch autograd
    (:func:`unrolled_meta_loss`): the oracle (c) is tested against, and the
    wall time per meta-iteration beside it.

Protocol (the pixel demo's): the meta-training digits are every digit but
the held-out pair. A few of them (``n_val_digits``, chosen by the seed) are
set aside as class-disjoint validation digits, and every choice (step sizes,
C, how many epochs or meta-iterations) is made on validation episodes of those
digits by models trained on the other meta-training digits only; then (b),
(c) and (d) are refit on every meta-training digit for the chosen number of
epochs / iterations. The test pair is scored last, on episodes drawn once per
K and shared by all four methods (paired differences). (c) and (d) train the
same backbone from the same initial weights on the same episodes; they differ
only in how the head's inner loop and its gradients are computed.

PyTorch is imported only here (and by :mod:`fastmaml.torch`), when a run
starts: ``pip install "fastmaml[torch]"``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from typing import Callable, Optional

import numpy as np

from . import EpisodeSampler, Tasks
from .datasets import load_digits_dataset
from .demo import _Log, _one_blas_thread, _verdict, _with_summary, to_json  # one progress bar, BLAS guard and output format
from .evaluation import adaptation_accuracy, choose_inner_lr, mean_ci, paired_difference

TORCH_HINT = 'pip install "fastmaml[torch]"'

PIXELS = "pixels + zero start"
PRETRAINED = "pre-trained CNN + LR per task"
ANIL_FASTMAML = "ANIL, fastmaml head"
ANIL_UNROLLED = "ANIL, unrolled torch head"
METHODS = (PIXELS, PRETRAINED, ANIL_FASTMAML, ANIL_UNROLLED)

PIXEL_LR_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # the pixel demo's grid
C_GRID = (0.1, 1.0, 10.0, 100.0)


@dataclasses.dataclass
class CNNDemoConfig:
    """Settings of the learned-representation experiment (see ``fastmaml demo --backbone cnn --help``).

    Attributes
    ----------
    holdout : tuple of int
        The test pair.
    shots : tuple of int
        K, support examples per class, at test time; ANIL meta-trains on the
        same K's in turn (one backbone for all of them).
    n_query : int
        Query examples per class of every validation and test episode.
    train_query : int
        Query examples per class of ANIL's meta-training episodes (fewer
        images through the backbone per iteration).
    test_episodes, val_episodes : int
        Episodes per K on the test pair / on the validation digits.
    n_val_digits : int
        Meta-training digits set aside for class-disjoint validation.
    inner_steps : int
        Steps of every inner loop (pixels, ANIL heads).
    inner_lr : float
        Initial step size of the ANIL head (learned, as a log).
    n_features : int
        Width of the embedding (the backbone's output).
    channels : tuple of int
        Channels of the two 3x3 convolutions (stride 2 each).
    meta_batch_size, meta_iterations, meta_lr, validate_every : int, int, float, int
        ANIL's outer loop (Adam on backbone and head); ``meta_iterations``
        bounds the selection run, validated every ``validate_every``.
    pretrain_epochs, pretrain_batch_size, pretrain_lr : int, int, float
        The classification pre-training of (b) (Adam); ``pretrain_epochs``
        bounds the selection run, validated after every epoch.
    timing_repeats : int
        Repeats of the head-only forward+backward timing of (c) and (d).
    seed : int
        Seeds numpy Generators (episodes, digit choice) and torch (weights, batches).
    data : str
        As ``fastmaml demo --data``.
    n_threads : int or None
        torch and OpenMP threads (None: the libraries' defaults).
    progress : bool
        A tqdm bar when tqdm is installed.
    """

    holdout: tuple = (2, 3)
    shots: tuple = (1, 5, 10)
    n_query: int = 15
    train_query: int = 5
    test_episodes: int = 600
    val_episodes: int = 100
    n_val_digits: int = 3
    inner_steps: int = 5
    inner_lr: float = 0.5
    n_features: int = 64
    channels: tuple = (16, 32)
    meta_batch_size: int = 16
    meta_iterations: int = 200
    meta_lr: float = 1e-3
    validate_every: int = 25
    pretrain_epochs: int = 6
    pretrain_batch_size: int = 64
    pretrain_lr: float = 1e-3
    timing_repeats: int = 20
    seed: int = 0
    data: str = "default"
    n_threads: Optional[int] = None
    progress: bool = True
    c_grid: tuple = C_GRID

    @classmethod
    def quick(cls, **overrides) -> "CNNDemoConfig":
        """A run of seconds (for tests): every stage, tiny budgets."""
        base = dict(shots=(1, 5, 10), test_episodes=40, val_episodes=20, meta_iterations=6, validate_every=3,
                    pretrain_epochs=1, meta_batch_size=4, timing_repeats=2, c_grid=(1.0, 10.0))
        base.update(overrides)
        return cls(**base)


# ------------------------------------------------------------------ torch, imported here only
def import_torch():
    """Import torch, or raise an ImportError saying how to install it."""
    try:
        import torch
    except ImportError as exc:
        raise ImportError(f"fastmaml demo --backbone cnn needs PyTorch: {TORCH_HINT} (torch is not installed: "
                          f"{exc})") from exc
    return torch


def _import_torch_head():
    import_torch()
    try:
        from . import torch as fastmaml_torch
    except ImportError as exc:
        raise ImportError(f"fastmaml.torch could not be imported ({exc}); {TORCH_HINT}") from exc
    return fastmaml_torch


def make_backbone(image_shape, *, n_features: int = 64, channels=(16, 32)):
    """The small CNN: two 3x3 convolutions (stride 2, ReLU), then a linear map to ``n_features``.

    Parameters
    ----------
    image_shape : tuple (height, width)
    n_features : int
    channels : tuple of two int

    Returns
    -------
    torch.nn.Sequential
        Maps images of shape (batch, 1, height, width) to features (batch, n_features).
    """
    torch = import_torch()
    nn = torch.nn
    h, w = image_shape
    for _ in range(2):  # a stride-2, padding-1 3x3 convolution halves each side, rounding up
        h, w = (h + 1) // 2, (w + 1) // 2
    c1, c2 = (int(c) for c in channels)
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(c2 * h * w, int(n_features)),
    )


def make_head(n_features: int, inner_lr: float):
    """The ANIL head's meta-parameters: ``theta`` (n_features + 1,) = [w, b] (zeros) and ``log_inner_lr`` ()."""
    torch = import_torch()
    head = torch.nn.Module()
    head.theta = torch.nn.Parameter(torch.zeros(int(n_features) + 1))
    head.log_inner_lr = torch.nn.Parameter(torch.tensor(float(np.log(inner_lr))))
    return head


# ------------------------------------------------------------------ the oracle head, plain torch
def _inner_loss(phi, Xs1, ys, l2):
    """Sum over tasks of each task's mean support loss, (l2/2)||w||^2 added (fastmaml's convention)."""
    torch = import_torch()
    z = torch.einsum("tnd,td->tn", Xs1, phi)
    data = torch.nn.functional.binary_cross_entropy_with_logits(z, ys, reduction="none").mean(dim=1)
    return (data + 0.5 * l2 * (phi[:, :-1] ** 2).sum(dim=1)).sum()


def _with_bias(X):
    torch = import_torch()
    return torch.cat([X, torch.ones(X.shape[:-1] + (1,), dtype=X.dtype)], dim=-1)


def unrolled_adapt(theta, support_X, support_y, *, inner_lr, inner_steps: int, l2=0.0, create_graph: bool = False):
    """The inner loop in plain torch autograd: ``inner_steps`` gradient steps from ``theta`` per task.

    Parameters
    ----------
    theta : tensor of shape (n_features + 1,)
        [w, b], bias last.
    support_X : tensor of shape (n_tasks, n_support, n_features)
    support_y : tensor of shape (n_tasks, n_support), 0/1
    inner_lr : float or tensor of shape () or (inner_steps,)
    inner_steps : int
    l2 : float or tensor of shape ()
    create_graph : bool
        Keep the graph of every step (second-order meta-gradients); otherwise
        the adapted parameters are detached.

    Returns
    -------
    tensor of shape (n_tasks, n_features + 1)
    """
    torch = import_torch()
    Xs1 = _with_bias(support_X)
    ys = support_y.to(Xs1.dtype)
    lr = torch.as_tensor(inner_lr, dtype=Xs1.dtype)
    phi = theta.expand(Xs1.shape[0], -1)
    with torch.enable_grad():
        if not create_graph:
            phi = phi.detach().requires_grad_(True)
        for j in range(int(inner_steps)):
            grad, = torch.autograd.grad(_inner_loss(phi, Xs1, ys, l2), phi, create_graph=create_graph)
            step = lr[j] if lr.ndim else lr
            phi = phi - step * grad
            if not create_graph:
                phi = phi.detach().requires_grad_(True)
    return phi if create_graph else phi.detach()


def unrolled_meta_loss(theta, support_X, support_y, query_X, query_y, *, inner_lr, inner_steps: int, l2=0.0):
    """fastmaml's binary meta-loss computed by unrolling the inner loop in torch autograd.

    The mean over tasks of the mean query log-loss after ``inner_steps``
    gradient steps on each task's support loss (plus (l2/2)||w||^2), as
    :func:`fastmaml.torch.meta_loss`; differentiable with respect to theta,
    inner_lr, l2 and both feature tensors (second order: the graph of every
    inner step is kept).

    Parameters
    ----------
    theta : tensor of shape (n_features + 1,)
    support_X : tensor of shape (n_tasks, n_support, n_features)
    support_y : tensor of shape (n_tasks, n_support), 0/1
    query_X : tensor of shape (n_tasks, n_query, n_features)
    query_y : tensor of shape (n_tasks, n_query), 0/1
    inner_lr : float or tensor of shape () or (inner_steps,)
    inner_steps : int
    l2 : float or tensor of shape ()

    Returns
    -------
    tensor of shape ()
    """
    torch = import_torch()
    phi = unrolled_adapt(theta, support_X, support_y, inner_lr=inner_lr, inner_steps=inner_steps, l2=l2,
                         create_graph=True)
    zq = torch.einsum("tmd,td->tm", _with_bias(query_X), phi)
    return torch.nn.functional.binary_cross_entropy_with_logits(zq, query_y.to(zq.dtype))


# ------------------------------------------------------------------ progress
def _progress(log: Optional[Callable[[str], None]], enabled: bool, total: int) -> _Log:
    return _Log(log, enabled, total, desc="fastmaml demo --backbone cnn", unit="step")


# ------------------------------------------------------------------ data
@dataclasses.dataclass
class _Episodes:
    """Fixed episodes of one K, in index form into the pixel array (the same rows for every method)."""

    K: int
    tasks: Tasks  # pixels, index form

    def on(self, features: np.ndarray) -> Tasks:
        """The same episodes over other per-image features (N, d): the rows stay, the features change."""
        s, q = self.tasks.support, self.tasks.query
        T = self.tasks.n_tasks
        return Tasks.from_index(features, s.idx.reshape(T, -1), s.y.reshape(T, -1), q.idx.reshape(T, -1),
                                q.y.reshape(T, -1), check_finite=False)

    def tensors(self, features):
        """(support_X, support_y, query_X, query_y) as torch tensors over per-image features (N, d) (a tensor)."""
        torch = import_torch()
        s, q = self.tasks.support, self.tasks.query
        T = self.tasks.n_tasks
        si = torch.from_numpy(s.idx.reshape(T, -1))
        qi = torch.from_numpy(q.idx.reshape(T, -1))
        return (features[si], torch.from_numpy(s.y.reshape(T, -1).astype(np.int64)), features[qi],
                torch.from_numpy(q.y.reshape(T, -1).astype(np.int64)))


def _choose_val_digits(train_digits: list, n_val: int, seed_seq) -> list:
    if not 2 <= n_val <= len(train_digits) - 2:
        raise ValueError(f"n_val_digits: expected 2 to {len(train_digits) - 2} validation digits (pairs need 2 "
                         f"digits on each side), got {n_val}")
    rng = np.random.default_rng(seed_seq)
    return sorted(int(c) for c in rng.permutation(train_digits)[:n_val])


def _embed(backbone, images, episodes=None, batch: int = 1000) -> np.ndarray:
    """Features (N, n_features) as float32 numpy, no gradients: of every image, or with ``episodes`` only of
    the rows they use (the other rows stay zero; validation embeds its digits, not the whole dataset)."""
    torch = import_torch()
    if episodes is None:
        rows = np.arange(images.shape[0])
    else:
        rows = np.unique(np.concatenate([np.concatenate([ep.tasks.support.idx, ep.tasks.query.idx])
                                         for ep in episodes]))
    index = torch.from_numpy(rows)
    with torch.no_grad():
        part = torch.cat([backbone(images[index[i:i + batch]]) for i in range(0, rows.size, batch)])
    if episodes is None:
        return part.numpy()
    out = np.zeros((images.shape[0], part.shape[1]), dtype=np.float32)
    out[rows] = part.numpy()
    return out


# ------------------------------------------------------------------ (b) classification pre-training
def _lr_accuracy(tasks: Tasks, C: float) -> np.ndarray:
    """Per task, scikit-learn LogisticRegression(C) fitted on the support set, accuracy on the query set."""
    from .evaluation import _sklearn

    LogisticRegression, ConvergenceWarning, _ = _sklearn()
    acc = np.empty(tasks.n_tasks)
    with warnings.catch_warnings(), _one_blas_thread():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for t in range(tasks.n_tasks):
            Xs, ys, Xq, yq = tasks.task(t)
            clf = LogisticRegression(C=C, max_iter=300).fit(Xs, ys)
            acc[t] = np.mean(clf.predict(Xq) == yq)
    return acc


def _l2_normalise(F: np.ndarray) -> np.ndarray:
    return F / np.maximum(np.linalg.norm(F, axis=1, keepdims=True), 1e-12)


def _pretrain(config, images, y, digits, val_episodes, n_epochs, make_model, progress, seed) -> dict:
    """(b): the backbone trained by ordinary classification of ``digits`` for ``n_epochs`` epochs.

    With ``val_episodes`` (the selection run) also the best epoch (LR at the middle C of the grid) and then C
    per K, both on the validation digits' episodes (LR on L2-normalised features).
    """
    from .evaluation import choose_C_on_validation

    torch = import_torch()
    torch.manual_seed(seed)
    backbone = make_model()
    classifier = torch.nn.Linear(config.n_features, len(digits))
    model = torch.nn.Sequential(backbone, classifier)
    opt = torch.optim.Adam(model.parameters(), lr=config.pretrain_lr)
    rows = np.flatnonzero(np.isin(y, digits))
    target = torch.from_numpy(np.searchsorted(digits, y[rows]).astype(np.int64))
    x_train = images[torch.from_numpy(rows)]
    gen = torch.Generator().manual_seed(seed)
    c_grid = tuple(sorted(config.c_grid))
    C_mid = c_grid[len(c_grid) // 2]
    best = (-1.0, 0, None)
    curve = []
    seconds = 0.0
    what = "choosing the epoch" if val_episodes else "refit on every meta-training digit"
    for epoch in range(1, n_epochs + 1):
        progress(f"(b) pre-training, {what}: epoch {epoch}/{n_epochs}")
        t0 = time.perf_counter()
        perm = torch.randperm(len(rows), generator=gen)
        for i in range(0, len(rows), config.pretrain_batch_size):
            batch = perm[i:i + config.pretrain_batch_size]
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]), target[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        seconds += time.perf_counter() - t0
        progress.step()
        if not val_episodes:
            continue
        # one C for choosing the epoch: a C per epoch and K would cost a grid of fits per epoch
        feats = _l2_normalise(_embed(backbone, images, val_episodes))
        score = float(np.mean([_lr_accuracy(ep.on(feats), C_mid).mean() for ep in val_episodes]))
        curve.append(score)
        if score > best[0]:
            best = (score, epoch, copy.deepcopy(backbone.state_dict()))
    out = {"backbone": backbone, "train_seconds": seconds}
    if not val_episodes:
        return out
    backbone.load_state_dict(best[2])
    progress("(b) choosing C on the validation digits")
    feats = _l2_normalise(_embed(backbone, images, val_episodes))
    C, val_acc = {}, {}
    with _one_blas_thread():
        for ep in val_episodes:
            C[ep.K], acc = choose_C_on_validation([ep.on(feats)], c_grid)
            val_acc[ep.K] = float(acc.max())
    out.update(C=C, val_accuracy=float(np.mean(list(val_acc.values()))), epoch=best[1], val_curve=curve)
    return out


# ------------------------------------------------------------------ (c), (d) ANIL
def _anil_accuracy(kind, backbone, head, images, episodes, config) -> dict:
    """Per-task query accuracy of every K's episodes, the head adapted by its own implementation."""
    torch = import_torch()
    feats = torch.from_numpy(_embed(backbone, images, episodes))
    theta = head.theta.detach()
    lr = float(head.log_inner_lr.detach().exp())
    out = {}
    for ep in episodes:
        if kind == "fastmaml":
            # fastmaml's own NumPy adaptation on the embedded episodes (index form over the features)
            out[ep.K] = adaptation_accuracy(theta.numpy(), ep.on(feats.numpy()), inner_lr=lr,
                                            inner_steps=config.inner_steps, n_threads=config.n_threads)
        else:
            Xs, ys, Xq, yq = ep.tensors(feats)
            phi = unrolled_adapt(theta, Xs, ys, inner_lr=lr, inner_steps=config.inner_steps)
            zq = torch.einsum("tmd,td->tm", _with_bias(Xq), phi)
            out[ep.K] = ((zq > 0).long() == yq).double().mean(dim=1).numpy()
    return out


def _meta_loss_fn(kind, fastmaml_torch, config):
    """The head's meta-loss of (c) or (d): the only difference between the two ANIL runs."""
    if kind == "fastmaml":
        def loss(head, Xs, ys, Xq, yq):
            return fastmaml_torch.meta_loss(head.theta, Xs, ys, Xq, yq, inner_lr=head.log_inner_lr.exp(),
                                            inner_steps=config.inner_steps, n_threads=config.n_threads)
    else:
        def loss(head, Xs, ys, Xq, yq):
            return unrolled_meta_loss(head.theta, Xs, ys, Xq, yq, inner_lr=head.log_inner_lr.exp(),
                                      inner_steps=config.inner_steps)
    return loss


def _batch_features(backbone, images, tasks: Tasks):
    """Backbone features of a meta-batch's support and query images: (T, n, d), (T, n), (T, m, d), (T, m)."""
    torch = import_torch()
    s, q = tasks.support, tasks.query
    T = tasks.n_tasks
    rows = torch.from_numpy(np.concatenate([s.idx, q.idx]))
    feats = backbone(images[rows])
    Xs, Xq = feats[:s.idx.size].reshape(T, -1, feats.shape[1]), feats[s.idx.size:].reshape(T, -1, feats.shape[1])
    return (Xs, torch.from_numpy(s.y.reshape(T, -1).astype(np.int64)), Xq,
            torch.from_numpy(q.y.reshape(T, -1).astype(np.int64)))


def _anil(kind, config, X, y, images, digits, val_episodes, n_iterations, make_model, progress, seed,
          sampler_seeds, fastmaml_torch=None) -> dict:
    """Meta-train backbone + head (ANIL) on episodes of ``digits`` for ``n_iterations`` iterations.

    Iteration i meta-trains on K = shots[i % len(shots)] (one backbone for every K). With ``val_episodes``
    (the selection run) the iteration best on them is found (0 = before any meta-training counts too) and
    its checkpoint returned.
    """
    torch = import_torch()
    torch.manual_seed(seed)
    backbone = make_model()
    head = make_head(config.n_features, config.inner_lr)
    opt = torch.optim.Adam(list(backbone.parameters()) + list(head.parameters()), lr=config.meta_lr)
    meta_loss = _meta_loss_fn(kind, fastmaml_torch, config)
    # (c) and (d) see the same episodes: samplers seeded alike
    samplers = [EpisodeSampler(X, y, n_way=2, k_shot=int(K), n_query=config.train_query, classes=digits,
                               random_state=np.random.default_rng(s)) for K, s in zip(config.shots, sampler_seeds)]
    name = ANIL_FASTMAML if kind == "fastmaml" else ANIL_UNROLLED
    what = "choosing the iteration" if val_episodes else "refit on every meta-training digit"

    def validate():
        if not val_episodes:
            return float("nan")
        acc = _anil_accuracy(kind, backbone, head, images, val_episodes, config)
        return float(np.mean([a.mean() for a in acc.values()]))

    best = {"val_accuracy": validate(), "iteration": 0, "state": copy.deepcopy((backbone.state_dict(),
                                                                                 head.state_dict()))}
    curve = [(0, best["val_accuracy"])]
    losses, seconds = [], []
    for it in range(1, n_iterations + 1):
        if it % 50 == 1:
            progress(f"{name}, {what}: iteration {it}/{n_iterations}")
        t0 = time.perf_counter()
        tasks = samplers[(it - 1) % len(samplers)].sample(config.meta_batch_size)
        loss = meta_loss(head, *_batch_features(backbone, images, tasks))
        opt.zero_grad()
        loss.backward()
        opt.step()
        seconds.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(f"{name}: the meta-loss became {losses[-1]} at iteration {it}; "
                                     "lower meta_lr or inner_lr")
        progress.step()
        if val_episodes and (it % config.validate_every == 0 or it == n_iterations):
            acc = validate()
            curve.append((it, acc))
            if acc > best["val_accuracy"]:
                best = {"val_accuracy": acc, "iteration": it,
                        "state": copy.deepcopy((backbone.state_dict(), head.state_dict()))}
    if val_episodes:
        backbone.load_state_dict(best["state"][0])
        head.load_state_dict(best["state"][1])
    return {"backbone": backbone, "head": head, "val_accuracy": best["val_accuracy"],
            "iteration": best["iteration"], "val_curve": curve, "loss_curve": losses,
            "iteration_seconds": seconds, "train_seconds": float(np.sum(seconds)),
            "inner_lr": float(head.log_inner_lr.detach().exp())}


def _time_heads(config, fastmaml_torch, backbone, images, X, y, train_digits, seed) -> dict:
    """Forward + backward of the head alone (features fixed), (c) and (d) interleaved: median seconds."""
    torch = import_torch()
    K = int(config.shots[len(config.shots) // 2])
    tasks = EpisodeSampler(X, y, n_way=2, k_shot=K, n_query=config.train_query, classes=train_digits,
                           random_state=np.random.default_rng(seed)).sample(config.meta_batch_size)
    with torch.no_grad():
        Xs, ys, Xq, yq = _batch_features(backbone, images, tasks)
    head = make_head(config.n_features, config.inner_lr)
    fns = {kind: _meta_loss_fn(kind, fastmaml_torch, config) for kind in ("fastmaml", "unrolled")}
    times = {kind: [] for kind in fns}
    for rep in range(1 + max(1, config.timing_repeats)):
        for kind, fn in fns.items():
            xs, xq = Xs.clone().requires_grad_(True), Xq.clone().requires_grad_(True)
            head.zero_grad()
            t0 = time.perf_counter()
            fn(head, xs, ys, xq, yq).backward()
            if rep:  # the first call of each warms up (allocations, thread pools)
                times[kind].append(time.perf_counter() - t0)
    return {"K": K, "n_tasks": config.meta_batch_size, "n_support": 2 * K, "n_query": 2 * config.train_query,
            "n_features": config.n_features, "inner_steps": config.inner_steps,
            "fastmaml_seconds": float(np.median(times["fastmaml"])),
            "unrolled_seconds": float(np.median(times["unrolled"]))}


# ------------------------------------------------------------------ the run
def run_cnn_demo(config: CNNDemoConfig, *, log: Optional[Callable[[str], None]] = print) -> dict:
    """Run the experiment; return every number as a JSON-able dict.

    Parameters
    ----------
    config : CNNDemoConfig
    log : callable or None
        Receives progress messages when no tqdm bar is shown.

    Returns
    -------
    dict
        ``shots[K]["table"][method]`` holds ``accuracy``, ``accuracy_ci95``,
        ``per_task`` and the paired differences ``vs_pretrained`` and
        ``vs_pixels`` (``mean``, ``ci95``); ``methods`` what each method chose
        on validation and its training time; ``timing`` the wall time per
        meta-iteration and of the head alone for (c) and (d); ``summary``
        one sentence per K.
    """
    torch = import_torch()
    fastmaml_torch = _import_torch_head()
    t_start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_digits_dataset(config.data)
    notes = [str(w.message) for w in caught]
    if data.image_shape is None:
        raise ValueError(f"data: {data.name!r} has no image shape; the CNN needs images")
    X, y = data.X, data.y
    classes = sorted(int(c) for c in np.unique(y))
    holdout = [int(c) for c in config.holdout]
    if len(holdout) != 2 or holdout[0] == holdout[1] or any(c not in classes for c in holdout):
        raise ValueError(f"holdout: expected two different digits of the data {classes}, got {holdout}")
    shots = [int(K) for K in config.shots]
    if not shots or min(shots) < 1 or len(set(shots)) != len(shots):
        raise ValueError(f"shots: expected different positive K's, got {config.shots}")
    for name in ("test_episodes", "val_episodes", "meta_batch_size", "meta_iterations", "validate_every",
                 "pretrain_epochs", "inner_steps", "n_query", "train_query"):
        if int(getattr(config, name)) < 1:
            raise ValueError(f"{name}: expected a positive integer, got {getattr(config, name)}")

    seq = np.random.SeedSequence(config.seed)
    s_digits, s_test, s_val, s_train, s_torch, s_time = seq.spawn(6)
    meta_digits = [c for c in classes if c not in holdout]
    val_digits = _choose_val_digits(meta_digits, int(config.n_val_digits), s_digits)
    train_digits = [c for c in meta_digits if c not in val_digits]
    torch_seeds = [int(s.generate_state(1)[0]) for s in s_torch.spawn(2)]
    sampler_seeds = s_train.spawn(len(shots))

    def episodes(cls, seeds, n):
        return [_Episodes(K, EpisodeSampler(X, y, n_way=2, k_shot=K, n_query=config.n_query, classes=cls,
                                            random_state=np.random.default_rng(s)).sample(n))
                for K, s in zip(shots, seeds.spawn(len(shots)))]

    test_eps = episodes(holdout, s_test, config.test_episodes)
    val_eps = episodes(val_digits, s_val, config.val_episodes)
    images = torch.from_numpy(X.astype(np.float32)).reshape(X.shape[0], 1, *data.image_shape)

    def make_model():
        return make_backbone(data.image_shape, n_features=config.n_features, channels=config.channels)

    results = {
        "config": dataclasses.asdict(config),
        "family": "digits",
        "backbone": "cnn",
        "data": {"name": data.name, "description": data.description, "n_samples": int(X.shape[0]),
                 "image_shape": list(data.image_shape), "notes": notes},
        "holdout": holdout,
        "meta_train_digits": meta_digits,
        "train_digits": train_digits,
        "validation_digits": val_digits,
        "methods": {},
        "shots": {},
    }
    if notes and log is not None:
        for n in notes:
            log(f"note: {n}")
    threads_before = torch.get_num_threads()
    if config.n_threads:
        torch.set_num_threads(int(config.n_threads))
    # an upper bound: the refits run as many epochs / iterations as validation chose
    progress = _progress(log, config.progress, 2 * config.pretrain_epochs + 4 * config.meta_iterations + 1)
    per_task = {}
    try:
        # (a) pixels + zero start: only the step size, chosen on the validation digits
        progress("(a) pixels + zero start")
        zero = np.zeros(X.shape[1] + 1)
        per_task[PIXELS], lrs = {}, {}
        for val, test in zip(val_eps, test_eps):
            lr, _ = choose_inner_lr(zero, [val.tasks], PIXEL_LR_GRID, inner_steps=config.inner_steps,
                                    n_threads=config.n_threads)
            lrs[test.K] = lr
            per_task[PIXELS][test.K] = adaptation_accuracy(zero, test.tasks, inner_lr=lr,
                                                           inner_steps=config.inner_steps, n_threads=config.n_threads)
        results["methods"][PIXELS] = {"choice": {"inner_lr": lrs}, "train_seconds": 0.0}

        # (b) pre-trained embedding + logistic regression per task: epoch and C chosen with the validation
        # digits held out, then the backbone refit on every meta-training digit for that many epochs
        sel = _pretrain(config, images, y, train_digits, val_eps, config.pretrain_epochs, make_model, progress,
                        torch_seeds[0])
        pre = _pretrain(config, images, y, meta_digits, None, sel["epoch"], make_model, progress, torch_seeds[0])
        progress("(b) logistic regression per test task")
        feats = _l2_normalise(_embed(pre["backbone"], images, test_eps))
        per_task[PRETRAINED] = {ep.K: _lr_accuracy(ep.on(feats), sel["C"][ep.K]) for ep in test_eps}
        results["methods"][PRETRAINED] = {
            "choice": {"epochs": sel["epoch"], "C": sel["C"]}, "val_accuracy": sel["val_accuracy"],
            "val_curve": sel["val_curve"], "train_seconds": sel["train_seconds"] + pre["train_seconds"]}

        # (c), (d) ANIL: the same initial weights (torch_seeds[1]) and episodes, two implementations of the head;
        # the iteration chosen with the validation digits held out, then a refit on every meta-training digit
        iteration_seconds = {}
        for kind, name in (("fastmaml", ANIL_FASTMAML), ("unrolled", ANIL_UNROLLED)):
            sel = _anil(kind, config, X, y, images, train_digits, val_eps, config.meta_iterations, make_model,
                        progress, torch_seeds[1], sampler_seeds, fastmaml_torch)
            run = _anil(kind, config, X, y, images, meta_digits, None, sel["iteration"], make_model, progress,
                        torch_seeds[1], sampler_seeds, fastmaml_torch)
            progress(f"{name}: test episodes")
            per_task[name] = _anil_accuracy(kind, run["backbone"], run["head"], images, test_eps, config)
            results["methods"][name] = {
                "choice": {"iterations": sel["iteration"], "inner_lr": run["inner_lr"]},
                "val_accuracy": sel["val_accuracy"], "val_curve": sel["val_curve"],
                "loss_curve": sel["loss_curve"], "refit_loss_curve": run["loss_curve"],
                "train_seconds": sel["train_seconds"] + run["train_seconds"]}
            iteration_seconds[name] = float(np.median(sel["iteration_seconds"] + run["iteration_seconds"]))
            if kind == "fastmaml":
                trained = run["backbone"]
        progress("timing the heads alone")
        head_times = _time_heads(config, fastmaml_torch, trained, images, X, y, train_digits, s_time)
        progress.step()
    finally:
        progress.close()
        torch.set_num_threads(threads_before)
    results["timing"] = {
        "seconds_per_meta_iteration": iteration_seconds,
        "head_forward_backward": head_times,
        "note": "median wall time on this machine; the meta-iteration includes sampling, the backbone's forward "
                "and backward passes and the Adam step",
    }
    for ep in test_eps:
        table = {}
        for name in METHODS:
            acc = np.asarray(per_task[name][ep.K], dtype=np.float64)
            mean, ci = mean_ci(acc)
            table[name] = {"accuracy": mean, "accuracy_ci95": ci, "per_task": acc}
        for row in table.values():
            row["vs_pretrained"] = paired_difference(row["per_task"], table[PRETRAINED]["per_task"])
            row["vs_pixels"] = paired_difference(row["per_task"], table[PIXELS]["per_task"])
            row["per_task"] = row["per_task"].tolist()
        results["shots"][str(ep.K)] = {"table": table, "n_test_episodes": ep.tasks.n_tasks}
    results["total_seconds"] = time.perf_counter() - t_start
    results["summary"] = summarize(results)
    return results


def summarize(results: dict) -> list:
    """One sentence per K on whether meta-training through the head beats the pre-trained embedding,
    then one on the two heads; computed from the numbers, whatever they show."""
    lines = []
    for K, res in results["shots"].items():
        t = res["table"]
        row = t[ANIL_FASTMAML]
        lines.append(f"K={K}: meta-training through the head ({ANIL_FASTMAML}, {100 * row['accuracy']:.1f}%) "
                     f"{_verdict(row['vs_pretrained'], 'the pre-trained embedding')} and "
                     f"{_verdict(row['vs_pixels'], 'pixels + zero start')}; the pre-trained embedding "
                     f"{_verdict(t[PRETRAINED]['vs_pixels'], 'pixels + zero start')}.")
    both = []
    for K, res in results["shots"].items():
        a, b = res["table"][ANIL_FASTMAML]["per_task"], res["table"][ANIL_UNROLLED]["per_task"]
        d = paired_difference(a, b)
        both.append(f"K={K} {100 * d['mean']:+.1f} +/- {100 * d['ci95']:.1f}")
    tm = results["timing"]
    per_it = tm["seconds_per_meta_iteration"]
    head = tm["head_forward_backward"]
    lines.append(f"The two ANIL heads (same weights, episodes and maths; fastmaml minus unrolled torch): "
                 f"{', '.join(both)} points. Wall time per meta-iteration: fastmaml head "
                 f"{1000 * per_it[ANIL_FASTMAML]:.1f} ms, unrolled torch head {1000 * per_it[ANIL_UNROLLED]:.1f} ms; "
                 f"the head's forward+backward alone: {1000 * head['fastmaml_seconds']:.2f} ms vs "
                 f"{1000 * head['unrolled_seconds']:.2f} ms "
                 f"({head['unrolled_seconds'] / max(head['fastmaml_seconds'], 1e-12):.1f}x).")
    return lines


def format_table(results: dict) -> str:
    """The results table as text."""
    out = [f"Learned representation (CNN backbone), {results['data']['name']} ({results['data']['n_samples']} "
           f"images): every choice made on validation digits {results['validation_digits']} with training on "
           f"{results['train_digits']}; then refit on all of {results['meta_train_digits']}; test on "
           f"{results['holdout'][0]} vs {results['holdout'][1]}"]
    for K, res in results["shots"].items():
        out.append("")
        out.append(f"K = {K} shots per class, {res['n_test_episodes']} test episodes (the same for every method)")
        out.append(f"  {'method':<32} {'accuracy':>15} {'vs pre-trained':>16} {'vs pixels':>16} {'train s':>8}")
        for name, row in res["table"].items():
            def fmt(d):
                return f"{100 * d['mean']:+.1f} +/- {100 * d['ci95']:.1f}"
            out.append(f"  {name:<32} {100 * row['accuracy']:>7.1f} +/- {100 * row['accuracy_ci95']:>4.1f} "
                       f"{fmt(row['vs_pretrained']):>16} {fmt(row['vs_pixels']):>16} "
                       f"{results['methods'][name]['train_seconds']:>8.1f}")
    tm = results["timing"]
    head = tm["head_forward_backward"]
    out.append("")
    out.append("Wall time (median, this machine)          fastmaml head   unrolled torch head")
    per_it = tm["seconds_per_meta_iteration"]
    out.append(f"  per meta-iteration (backbone included) {1000 * per_it[ANIL_FASTMAML]:>12.1f} ms "
               f"{1000 * per_it[ANIL_UNROLLED]:>17.1f} ms")
    out.append(f"  head forward+backward alone            {1000 * head['fastmaml_seconds']:>12.2f} ms "
               f"{1000 * head['unrolled_seconds']:>17.2f} ms   (T={head['n_tasks']}, n={head['n_support']}, "
               f"m={head['n_query']}, d={head['n_features']}, {head['inner_steps']} steps)")
    return _with_summary(out, results)


# ------------------------------------------------------------------ command line
def main(args) -> int:
    """``fastmaml demo --backbone cnn``: run, print the table, write --json (called by :mod:`fastmaml.cli`)."""
    import sys

    from .cli import CLIError, _check_output, _write_text

    if args.family != "digits":
        raise CLIError(f"--backbone cnn: runs the digit-pair experiment only, not --family {args.family}")
    if args.all_pairs or args.ways != 2:
        raise CLIError("--backbone cnn: runs the digit-pair experiment on one held-out pair (no --all-pairs "
                       "or --ways)")
    if args.json:
        _check_output(args.json, "--json")
    import_torch()  # fail before any computing
    overrides = {"seed": args.seed, "data": args.data, "n_threads": args.threads,
                 "progress": not args.no_progress and sys.stderr.isatty()}
    if args.holdout:
        if len(args.holdout) != 2 or args.holdout[0] == args.holdout[1]:
            raise CLIError(f"--holdout: expected 2 different digits, got {args.holdout}")
        overrides["holdout"] = args.holdout
    if args.shots:
        overrides["shots"] = args.shots
    if args.iterations:
        overrides["meta_iterations"] = args.iterations
    if args.test_episodes:
        overrides["test_episodes"] = args.test_episodes
    if args.inner_steps:
        overrides["inner_steps"] = args.inner_steps
    make = CNNDemoConfig.quick if args.quick else CNNDemoConfig
    results = run_cnn_demo(make(**overrides), log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_table(results))
    if args.json:
        _write_text(args.json, to_json(results), "--json")
        print(f"results written to {args.json}")
    return 0
