"""Linear classification probe on frozen features: ``fit_linear_probe``.

Protocol (both backends):

1. Features are standardised with the per-column mean / std of the TRAINING split only (constant columns
   map to 0). The test split never influences the probe.
2. A stratified held-out part of the training split (``val_fraction``, default 20%) picks the
   hyper-parameters from a small grid; the probe is then refit on the whole training split with the chosen
   values and evaluated once on the test split.
3. Top-1 accuracy on the test split, and top-5 only when there are more than 5 classes (with 5 or fewer it
   is 1.0 by construction: ``ProbeResult.top5`` is then None and no "top5" row or figure is written).

Backends:

- ``"sklearn"``: multinomial logistic regression (L-BFGS), sweeping the inverse regularisation ``C`` over
  :data:`DEFAULT_CS`, each fit warm-started from the previous one. Needs the (standardised) training matrix
  in memory. Runs with one BLAS / OpenMP thread (``threadpoolctl``): on small problems the BLAS thread pools
  only fight torch's threads (a 0.1 s fit took 1-20 s on a busy 2-core machine).
- ``"torch"``: a linear head trained with AdamW (cosine schedule, mini-batches, zero init) sweeping
  learning rate x weight decay; every grid point trains in the same pass over the data. Streams
  mini-batches from the feature array, so ``np.memmap`` inputs work at ImageNet scale; runs on the GPU
  when one is available (``device=None``).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import time
import warnings
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from repa_probe.analysis.errors import MetricInputError
from repa_probe.analysis.probes.common import (Array, channel_stats, check_features, check_finite, check_labels, chunks,
                                               gather, rows_per_chunk)
from repa_probe.devices import resolve_device

BACKENDS = ("sklearn", "torch")
TOPK = 5  # top-k accuracy is reported only with more than TOPK classes (else it is 1 by construction)
# Inverse regularisation grid of the sklearn probe, one point per decade (standardised features). The optimum
# depends on the data: the tiny run's blocks on digits pick C = 10 (held out; 0.01 is up to 0.25 below), the
# benchmark's noisy 768-d blobs pick C = 0.001 (0.88 vs 0.82 at C = 0.1). Fits are warm-started from the
# previous (smaller) C, so the small-C points cost a few L-BFGS iterations each.
DEFAULT_CS = (0.001, 0.01, 0.1, 1.0, 10.0)

# The dataset a linear probe reads when none is given, by the checkpoints' training dataset (others: the
# training dataset itself). The built-in `shapes` classes (a silhouette under random colour, size, position,
# rotation and a textured background) are not linearly separable in mean-pooled features, nor in raw pixels:
# a linear probe sits at chance whatever the model. `digits` has a class signal a linear probe can read (raw
# pixels: ~97% top-1) in the same 32-px RGB format, so the probe shows how much of it each block keeps as t
# grows (tiny run: ~0.9 at t = 0, chance 0.1 at t = 1).
DEFAULT_PROBE_DATA = {"shapes": "digits"}


def default_probe_data(trained_on: str) -> str:
    """The linear probe's dataset for checkpoints trained on ``trained_on`` (:data:`DEFAULT_PROBE_DATA`)."""
    return DEFAULT_PROBE_DATA.get(trained_on, trained_on)


def reports_topk(num_classes: int) -> bool:
    """Whether top-:data:`TOPK` accuracy is informative (more than TOPK classes)."""
    return num_classes > TOPK


@dataclasses.dataclass
class ProbeResult:
    """Outcome of :func:`fit_linear_probe`.

    ``top1``: test accuracy in [0, 1]; ``top5``: top-``topk`` test accuracy, None (and ``topk`` None) with
    :data:`TOPK` classes or fewer; ``hparams``: the chosen hyper-parameters plus how they were chosen
    (``selection``: "held-out", "fixed" or "default"); ``val_top1``: held-out accuracy of the chosen point
    (None without a sweep); ``sweep``: one dict per grid point with its held-out top-1; ``hits``: per test
    image, whether it was right (``{"top1": (M,) bool, "top5": (M,) bool}``, the metrics' keys), for bootstrap
    intervals over test images (not in :meth:`to_dict`).
    """

    top1: float
    top5: float | None
    topk: int | None
    hparams: dict
    val_top1: float | None
    sweep: list
    backend: str
    num_train: int
    num_test: int
    num_classes: int
    fit_seconds: float
    hits: dict = dataclasses.field(default_factory=dict, repr=False)

    def metrics(self) -> dict[str, float]:
        """The reported metrics: ``{"top1": ...}``, plus ``"top5"`` with more than :data:`TOPK` classes."""
        return {"top1": self.top1} if self.top5 is None else {"top1": self.top1, "top5": self.top5}

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "hits"}
        if self.top5 is None:
            del d["top5"], d["topk"]
        return d


@dataclasses.dataclass(frozen=True)
class LinearProbeConfig:
    """How :func:`fit_linear_probe` fits (checked when built, :class:`MetricInputError`).

    ``backend``: "sklearn" (logistic regression, L-BFGS, grid ``Cs``, ``max_iter``) or "torch" (AdamW linear
    head, grid ``lrs`` x ``weight_decays``, ``epochs``, ``batch_size``); ``val_fraction``: share of each class
    held out of the training split to choose the hyper-parameters (with a single grid point, or when the
    held-out part would be empty or leave fewer than two classes to fit on, the grid's middle point is used
    without a sweep); ``seed``: the held-out split and the torch backend's shuffling.
    """

    backend: str = "sklearn"
    val_fraction: float = 0.2
    seed: int = 0
    Cs: tuple = DEFAULT_CS
    max_iter: int = 1000
    lrs: tuple = (1e-3, 1e-2)
    weight_decays: tuple = (1e-4, 1e-1)
    epochs: int = 30
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise MetricInputError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise MetricInputError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        grids = {"Cs": self.Cs} if self.backend == "sklearn" else {"lrs": self.lrs, "weight_decays": self.weight_decays}
        for name, grid in grids.items():
            if len(grid) == 0 or any(not (isinstance(v, numbers.Real) and v >= 0) for v in grid):
                raise MetricInputError(f"{name} must be a non-empty sequence of non-negative numbers, got {grid!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise MetricInputError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")

    @property
    def grid_size(self) -> int:
        return len(self.Cs) if self.backend == "sklearn" else len(self.lrs) * len(self.weight_decays)


@dataclasses.dataclass
class _Problem:
    """One fit: features ``train_x (N, D)`` / ``test_x (M, D)`` (raw arrays for torch, standardised numpy for
    sklearn), int64 labels, the held-out ``split`` ``(fit_idx, val_idx)`` or ``(None, None)``, the classes,
    ``k`` of top-k, the training ``mean``/``std`` ``(D,)`` and the ``device``."""

    train_x: Any
    train_y: Any
    test_x: Any
    test_y: Any
    split: tuple
    num_classes: int
    k: int
    mean: Any = None
    std: Any = None
    device: Any = None


def stratified_holdout(y: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices ``0..N-1`` into (fit, held-out), taking ``floor(fraction * n_c)`` random samples of each
    class c into the held-out part. ``y: (N,)`` int64 >= 0. Returns two sorted int64 tensors."""
    n = y.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    order = torch.argsort(y[perm], stable=True)
    p, ys = perm[order], y[perm][order]
    counts = torch.bincount(ys)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[ys]
    n_val = torch.floor(counts.double() * fraction).long()
    val = rank < n_val[ys]
    return p[~val].sort().values, p[val].sort().values


def _topk_hits(scores: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores: (B, K), y: (B,) → (right at top-1 (B,) bool, right at top-k (B,) bool), on the CPU."""
    hit = (scores.topk(k, dim=1).indices == y[:, None]).cpu()
    return hit[:, 0], hit.any(dim=1)


def _select(sweep: list[dict], candidates: list[dict]) -> tuple[dict, float | None]:
    """(grid point, its held-out top-1): the best held-out top-1, the earliest in grid order on ties; without a
    sweep, the middle of the grid and None."""
    if not sweep:
        return dict(candidates[len(candidates) // 2]), None
    best = max(range(len(sweep)), key=lambda i: (sweep[i]["val_top1"], -i))
    return dict(candidates[best]), sweep[best]["val_top1"]


# ----------------------------------------------------------------------------------------------- sklearn
def _standardised_numpy(x: Array, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    out = np.empty(x.shape, dtype=np.float32)
    cpu = torch.device("cpu")
    m, s = mean.to(cpu), std.to(cpu)
    for idx in chunks(x.shape[0], rows_per_chunk(x)):
        out[idx[0]: idx[-1] + 1] = ((gather(x, idx, cpu) - m) / s).numpy()
    return out


def _sk_fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int, seed: int, init=None):
    """Logistic regression at ``C = c``; ``init`` (a fitted classifier with the same classes) is the
    starting point (warm start: same optimum, fewer L-BFGS iterations)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    warm = init is not None and np.array_equal(init.classes_, np.unique(y))
    clf = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, random_state=seed, warm_start=warm)
    if warm:
        clf.coef_, clf.intercept_ = init.coef_.copy(), init.intercept_.copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return clf, converged


def _sk_scores(clf, x: np.ndarray, num_classes: int) -> torch.Tensor:
    """(B, num_classes) logits (``decision_function``; a binary fit gives ``[0, d]``); classes never seen in
    training get -inf."""
    d = torch.from_numpy(np.asarray(clf.decision_function(x), dtype=np.float64))
    if d.ndim == 1:
        d = torch.stack([torch.zeros_like(d), d], dim=1)
    out = torch.full((x.shape[0], num_classes), -math.inf, dtype=torch.float64)
    out[:, torch.as_tensor(clf.classes_, dtype=torch.long)] = d
    return out


def _fit_sklearn(p: _Problem, cfg: LinearProbeConfig):
    tx, ty, vx, vy, num_classes, k, seed, max_iter = p.train_x, p.train_y, p.test_x, p.test_y, p.num_classes, p.k, \
        cfg.seed, cfg.max_iter
    candidates = [{"C": float(c)} for c in cfg.Cs]
    sweep: list[dict] = []
    fit_idx, val_idx = p.split
    with threadpool_limits(limits=1):
        fitted = {}
        if fit_idx is not None:
            prev = None
            for cand in sorted(candidates, key=lambda c: c["C"]):  # warm start along the regularisation path
                prev, conv = _sk_fit(tx[fit_idx], ty[fit_idx], cand["C"], max_iter, seed, init=prev)
                acc = _topk_hits(_sk_scores(prev, tx[val_idx], num_classes), torch.from_numpy(ty[val_idx]), 1)[0]
                fitted[cand["C"]] = (prev, {**cand, "val_top1": int(acc.sum()) / len(val_idx), "converged": conv})
            sweep = [fitted[c["C"]][1] for c in candidates]
        chosen, val = _select(sweep, candidates)
        clf, conv = _sk_fit(tx, ty, chosen["C"], max_iter, seed, init=fitted.get(chosen["C"], (None,))[0])
        hits = _topk_hits(_sk_scores(clf, vx, num_classes), torch.from_numpy(vy), k)
    return hits, {**chosen, "max_iter": max_iter, "converged": conv}, sweep, val


# ----------------------------------------------------------------------------------------------- torch
def train_linear_heads(p: _Problem, idx: torch.Tensor, configs: Sequence[dict],
                       cfg: LinearProbeConfig) -> list[torch.nn.Linear]:
    """Train one zero-initialised ``nn.Linear(D, num_classes)`` per config (``lr``, ``weight_decay``) on rows
    ``idx`` of ``p.train_x: (N, D)`` (standardised on the fly with ``p.mean, p.std: (D,)``), all in the same pass
    over shuffled mini-batches (``cfg.epochs``, ``cfg.batch_size``, order seeded by ``cfg.seed``). AdamW (weight
    decay on the weights only) with a per-step cosine schedule."""
    x, y, mean, std, device = p.train_x, p.train_y, p.mean, p.std, p.device
    epochs, batch_size, seed, num_classes = cfg.epochs, cfg.batch_size, cfg.seed, p.num_classes
    gen = torch.Generator().manual_seed(int(seed))
    heads = [torch.nn.Linear(x.shape[1], num_classes, device=device) for _ in configs]
    groups = []
    for h, cfg in zip(heads, configs):
        torch.nn.init.zeros_(h.weight)
        torch.nn.init.zeros_(h.bias)
        groups.append({"params": [h.weight], "lr": cfg["lr"], "weight_decay": cfg["weight_decay"]})
        groups.append({"params": [h.bias], "lr": cfg["lr"], "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    steps_per_epoch = math.ceil(len(idx) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))
    for _ in range(epochs):
        perm = idx[torch.randperm(len(idx), generator=gen)]
        for start in range(0, len(perm), batch_size):
            b = perm[start: start + batch_size].sort().values  # sorted rows read memory-mapped files faster
            xb = (gather(x, b, device) - mean) / std
            yb = y[b].to(device)
            loss = sum(F.cross_entropy(h(xb), yb) for h in heads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return heads


@torch.no_grad()
def evaluate_linear_heads(heads, x: Array, y: torch.Tensor, idx: torch.Tensor, mean, std, k: int,
                          device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per head, (right at top-1, right at top-k) of every row ``idx`` of ``x``: two ``(len(idx),)`` bool
    tensors on the CPU."""
    parts: list[list] = [[] for _ in heads]
    step = rows_per_chunk(x)
    for start in range(0, len(idx), step):
        b = idx[start: start + step]
        xb = (gather(x, b, device) - mean) / std
        yb = y[b].to(device)
        for part, h in zip(parts, heads):
            part.append(_topk_hits(h(xb), yb, k))
    return [(torch.cat([p[0] for p in part]), torch.cat([p[1] for p in part])) for part in parts]


def _fit_torch(p: _Problem, cfg: LinearProbeConfig):
    candidates = [{"lr": float(lr), "weight_decay": float(wd)} for lr, wd in itertools.product(cfg.lrs,
                                                                                                cfg.weight_decays)]
    sweep: list[dict] = []
    fit_idx, val_idx = p.split
    train = lambda idx, configs: train_linear_heads(p, idx, configs, cfg)  # noqa: E731
    if fit_idx is not None:
        hits = evaluate_linear_heads(train(fit_idx, candidates), p.train_x, p.train_y, val_idx, p.mean, p.std, 1,
                                     p.device)
        sweep = [{**c, "val_top1": int(h1.sum()) / len(val_idx)} for c, (h1, _) in zip(candidates, hits)]
    chosen, val = _select(sweep, candidates)
    head = train(torch.arange(p.train_x.shape[0]), [chosen])
    hits, = evaluate_linear_heads(head, p.test_x, p.test_y, torch.arange(p.test_x.shape[0]), p.mean, p.std, p.k,
                                  p.device)
    return hits, {**chosen, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "optimizer": "AdamW"}, sweep, val


# ----------------------------------------------------------------------------------------------- entry point
def _checked_inputs(train_x, train_y, test_x, test_y, num_classes):
    """Validated ``(train_x, train_y, test_x, test_y, num_classes)`` (labels as int64 tensors)."""
    train_x = check_features(train_x, "train_x", (2,))
    test_x = check_features(test_x, "test_x", (2,))
    if train_x.shape[1] != test_x.shape[1]:
        raise MetricInputError(f"train_x has {train_x.shape[1]} features per row but test_x has {test_x.shape[1]}")
    ty = check_labels(train_y, train_x.shape[0], "train_y")
    vy = check_labels(test_y, test_x.shape[0], "test_y")
    if num_classes is None:
        lo = min(int(ty.min()), int(vy.min()))
        if lo < 0:
            raise MetricInputError(f"labels must be >= 0, got {lo}")
        num_classes = max(int(ty.max()), int(vy.max())) + 1
    if num_classes < 2:
        raise MetricInputError(f"num_classes must be >= 2, got {num_classes}")
    check_labels(ty, train_x.shape[0], "train_y", num_classes)
    check_labels(vy, test_x.shape[0], "test_y", num_classes)
    present = int((torch.bincount(ty, minlength=num_classes) > 0).sum())
    if present < 2:
        raise MetricInputError(f"train_y has a single class ({int(ty[0])}); a probe needs at least two")
    return train_x, ty, test_x, vy, num_classes


def fit_linear_probe(train_x: Array, train_y: Any, test_x: Array, test_y: Any,
                     config: LinearProbeConfig | None = None, num_classes: int | None = None,
                     device: Any = None) -> ProbeResult:
    """Fit a linear probe on ``train_x: (N, D)`` / ``train_y: (N,)`` and report test accuracy.

    Args:
        train_x, test_x: feature matrices ``(N, D)`` / ``(M, D)``: torch tensors or numpy arrays (memmaps
            welcome), any floating dtype; computed on in float32.
        train_y, test_y: integer class labels ``(N,)`` / ``(M,)``.
        config: :class:`LinearProbeConfig` (backend, grids, held-out fraction, seed, epochs, batch size).
        num_classes: the declared classes ``0..num_classes-1``; None = ``max(label) + 1`` over both splits.
        device: the torch backend's device (None = CUDA if available).

    Raises:
        MetricInputError: empty splits, NaN / inf features, mismatched lengths or widths, non-integer labels,
            labels outside the declared classes, a training split with a single class.
    """
    cfg = config or LinearProbeConfig()
    train_x, ty, test_x, vy, num_classes = _checked_inputs(train_x, train_y, test_x, test_y, num_classes)

    t0 = time.perf_counter()
    dev = resolve_device(device) if cfg.backend == "torch" else torch.device("cpu")
    mean, std = channel_stats(train_x, "train_x", 1, dev)
    check_finite(test_x, "test_x", dev)
    k = TOPK if reports_topk(num_classes) else 1
    split: tuple = (None, None)
    selection = "fixed" if cfg.grid_size == 1 else "default"
    if cfg.grid_size > 1 and cfg.val_fraction > 0:
        fit_idx, val_idx = stratified_holdout(ty, cfg.val_fraction, cfg.seed)
        if len(val_idx) > 0 and len(torch.unique(ty[fit_idx])) >= 2:
            split, selection = (fit_idx, val_idx), "held-out"

    if cfg.backend == "sklearn":
        sk_split = tuple(None if s is None else s.numpy() for s in split)
        problem = _Problem(_standardised_numpy(train_x, mean, std), ty.numpy(), _standardised_numpy(test_x, mean, std),
                           vy.numpy(), sk_split, num_classes, k)
        hits, hparams, sweep, chosen_val = _fit_sklearn(problem, cfg)
    else:
        problem = _Problem(train_x, ty, test_x, vy, split, num_classes, k, mean, std, dev)
        hits, hparams, sweep, chosen_val = _fit_torch(problem, cfg)
    hparams["selection"] = selection
    if split[0] is not None:
        hparams["val_fraction"] = cfg.val_fraction
    m = test_x.shape[0]
    top5, k_out = (int(hits[1].sum()) / m, k) if reports_topk(num_classes) else (None, None)
    return ProbeResult(top1=int(hits[0].sum()) / m, top5=top5, topk=k_out, hparams=hparams, val_top1=chosen_val,
                       sweep=sweep, backend=cfg.backend, num_train=int(train_x.shape[0]), num_test=int(m),
                       num_classes=num_classes, fit_seconds=time.perf_counter() - t0,
                       hits={"top1": hits[0], **({"top5": hits[1]} if top5 is not None else {})})
