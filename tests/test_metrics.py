"""Tests for repa_probe.analysis.metrics: platonic-rep reference numbers, a dense re-derivation, invariances, errors."""
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from repa_probe.analysis.metrics import similarity as M
from repa_probe.analysis.errors import MetricInputError

REFERENCE = json.loads((Path(__file__).parent / "data" / "platonic_reference.json").read_text())


# ------------------------------------------------------------------------------------------------- helpers
def _generate(case):
    """The reference recipe (REFERENCE['recipe']['generator']): float64 numpy features a, b."""
    rng = np.random.default_rng(case["seed"])
    n, da, db = case["n"], case["d_a"], case["d_b"]
    a = rng.standard_t(3.0, size=(n, da)) if case["kind"] == "heavy_tailed" else rng.standard_normal((n, da))
    if case["kind"] == "independent":
        b = rng.standard_normal((n, db))
    else:
        b = a @ (rng.standard_normal((da, db)) / np.sqrt(da)) + case["noise"] * rng.standard_normal((n, db))
    return a + case["offset"], b + case["offset"]


def _prepare(x, prep):
    t = torch.from_numpy(x)
    if prep == "raw":
        return t
    if prep == "l2":
        return M.prepare_features(t, clip_quantile=None)
    return M.prepare_features(t, clip_quantile=0.95, exact="exact" in prep)


def _features(n, da=24, db=16, seed=0, noise=0.8, l2=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, da, generator=g, dtype=torch.float64) + 0.3
    b = a @ torch.randn(da, db, generator=g, dtype=torch.float64) / da ** 0.5
    b = b + noise * torch.randn(n, db, generator=g, dtype=torch.float64)
    if l2:
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    return a.to(dtype), b.to(dtype)


def _dense_hsic(x, y, unbiased):
    n = x.shape[0]
    if unbiased:
        x, y = x.clone().fill_diagonal_(0), y.clone().fill_diagonal_(0)
        return ((x * y.T).sum() + x.sum() * y.sum() / ((n - 1) * (n - 2)) - 2 * (x @ y).sum() / (n - 2)) / (n * (n - 3))
    h = torch.eye(n, dtype=x.dtype) - 1.0 / n
    return torch.trace(x @ h @ y @ h)


def _dense_mask(g, k, exclude_self):
    g_hat = g.clone().fill_diagonal_(float("-inf")) if exclude_self else g
    return torch.zeros_like(g).scatter_(1, torch.topk(g_hat, k, dim=1).indices, 1.0)


def _dense_cknna(a, b, k, unbiased=True):
    """Straightforward N×N evaluation of the CKNNA formula (float64)."""
    kk, ll = a.double() @ a.double().T, b.double() @ b.double().T
    mk, ml = _dense_mask(kk, k, unbiased), _dense_mask(ll, k, unbiased)
    m = mk * ml
    sim = lambda x, y: _dense_hsic(x, y, unbiased)
    return float(sim(m * kk, m * ll) / (torch.sqrt(sim(mk * kk, mk * kk) * sim(ml * ll, ml * ll)) + 1e-6))


def _dense_cka(a, b, unbiased):
    kk, ll = a.double() @ a.double().T, b.double() @ b.double().T
    h = lambda x, y: _dense_hsic(x, y, unbiased)
    return float(h(kk, ll) / (torch.sqrt(h(kk, kk) * h(ll, ll)) + 1e-6))


def _dense_mutual_cycle(a, b, k):
    mk = _dense_mask(a.double() @ a.double().T, k, True)
    ml = _dense_mask(b.double() @ b.double().T, k, True)
    mutual = float((mk * ml).sum(1).mean() / k)
    cycle = float((torch.diagonal(ml @ mk) > 0).double().mean())   # Σ_j [j ∈ kNN_b(i)] [i ∈ kNN_a(j)] > 0
    return mutual, cycle


# ------------------------------------------------------------------------------------- platonic reference
@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda c: c["name"])
def test_matches_platonic_reference(case):
    a, b = _generate(case)
    ta, tb = _prepare(a, case["prep"]), _prepare(b, case["prep"])
    for key, ref in case["values"].items():
        if key == "cka":
            value = M.cka(ta, tb)
        elif key == "unbiased_cka":
            value = M.unbiased_cka(ta, tb)
        elif key == "cknna_k_n_minus_1":
            value = M.cknna(ta, tb, topk=case["n"] - 1)
        else:
            name, k = key.rsplit("_k", 1)
            fn = {"cknna": M.cknna, "cknna_biased": functools.partial(M.cknna, unbiased=False),
                  "mutual_knn": M.mutual_knn, "cycle_knn": M.cycle_knn}[name]
            value = fn(ta, tb, topk=int(k))
        assert value == pytest.approx(ref, abs=1e-6), (key, value, ref)


@pytest.mark.parametrize("case", [c for c in REFERENCE["cases"] if "q_val_a" in c], ids=lambda c: c["name"])
def test_clip_threshold_matches_platonic(case):
    a, b = _generate(case)
    exact = "exact" in case["prep"]
    for x, ref in ((a, case["q_val_a"]), (b, case["q_val_b"])):
        clipped = M.prepare_features(x, l2=False, clip_quantile=0.95, exact=exact)
        assert isinstance(clipped, np.ndarray) and clipped.dtype == np.float64
        assert np.abs(clipped).max() == pytest.approx(ref, rel=1e-12)
        np.testing.assert_allclose(clipped, np.clip(x, -ref, ref), rtol=0, atol=1e-12)


def test_float32_inputs_agree_with_float64_reference():
    case = next(c for c in REFERENCE["cases"] if c["name"] == "correlated_l2")
    a, b = _generate(case)
    ta, tb = (_prepare(x, "l2").float() for x in (a, b))
    assert M.cknna(ta, tb, topk=10) == pytest.approx(case["values"]["cknna_k10"], abs=1e-5)
    assert M.cka(ta, tb) == pytest.approx(case["values"]["cka"], abs=1e-5)
    assert M.unbiased_cka(ta, tb) == pytest.approx(case["values"]["unbiased_cka"], abs=1e-5)
    assert M.mutual_knn(ta, tb, topk=10) == pytest.approx(case["values"]["mutual_knn_k10"], abs=1e-6)


# ------------------------------------------------------------------------------------ dense re-derivation
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("l2", [True, False])
@pytest.mark.parametrize("k", [2, 7])
def test_cknna_equals_dense_formula(unbiased, l2, k):
    a, b = _features(90, seed=k + 10 * l2, l2=l2)
    assert M.cknna(a, b, topk=k, unbiased=unbiased) == pytest.approx(_dense_cknna(a, b, k, unbiased), abs=1e-9)


def test_knn_metrics_equal_dense_formula():
    a, b = _features(120, seed=3, noise=0.5)
    mutual, cycle = _dense_mutual_cycle(a, b, 6)
    assert M.mutual_knn(a, b, topk=6) == pytest.approx(mutual, abs=1e-12)
    assert M.cycle_knn(a, b, topk=6) == pytest.approx(cycle, abs=1e-12)
    assert 0 < mutual < 1 and 0 < cycle < 1   # non-degenerate case


@pytest.mark.parametrize("n,da,db", [(200, 24, 16), (12, 20, 16)])   # feature-space path, Gram path
@pytest.mark.parametrize("unbiased", [True, False])
def test_cka_equals_dense_formula(n, da, db, unbiased):
    a, b = _features(n, da, db, seed=5, l2=False)
    assert M.cka(a, b, unbiased=unbiased) == pytest.approx(_dense_cka(a, b, unbiased), abs=1e-10)


def test_chunked_equals_unchunked():
    a, b = _features(150, seed=7)
    assert M.cknna(a, b, chunk_size=7) == pytest.approx(M.cknna(a, b), abs=1e-12)
    assert M.cknna(a, b, unbiased=False, chunk_size=3) == pytest.approx(M.cknna(a, b, unbiased=False), abs=1e-12)
    assert M.mutual_knn(a, b, chunk_size=4) == M.mutual_knn(a, b)
    assert M.cycle_knn(a, b, chunk_size=4) == M.cycle_knn(a, b)
    for unbiased in (False, True):
        assert M.cka(a, b, unbiased=unbiased, chunk_size=3) == pytest.approx(M.cka(a, b, unbiased=unbiased), abs=1e-12)


def test_numpy_and_torch_inputs_agree():
    a, b = _features(80, seed=9)
    assert M.cknna(a.numpy(), b.numpy(), topk=5) == M.cknna(a, b, topk=5)
    assert M.cka(a.numpy(), b) == M.cka(a, b)


# --------------------------------------------------------------------------------------------- invariances
def test_cka_invariant_to_orthogonal_transform_and_scaling():
    a, b = _features(300, 32, 24, seed=11, l2=False)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    for unbiased in (False, True):
        ref = M.cka(a, b, unbiased=unbiased)
        assert 0.2 < ref < 0.95
        assert M.cka(a @ q, b, unbiased=unbiased) == pytest.approx(ref, abs=1e-9)
        assert M.cka(3.0 * a, 0.5 * b, unbiased=unbiased) == pytest.approx(ref, abs=1e-7)


def test_cknna_invariant_to_rotation_and_joint_permutation():
    a, b = _features(200, seed=12)
    ref = M.cknna(a, b)
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(3))
    assert M.cknna(a @ q, b) == pytest.approx(ref, abs=1e-10)
    assert M.cknna(a[perm], b[perm]) == pytest.approx(ref, abs=1e-10)
    assert M.mutual_knn(a[perm], b[perm]) == pytest.approx(M.mutual_knn(a, b), abs=1e-12)


def test_self_alignment_is_one():
    a, _ = _features(200, seed=13, l2=False)      # raw features: masked HSICs >> the 1e-6 epsilon
    assert M.cknna(a, a) == pytest.approx(1.0, abs=1e-4)
    assert M.mutual_knn(a, a) == 1.0     # (cycle_knn(a, a) < 1: the kNN relation is not symmetric)
    assert M.cka(a, a) == pytest.approx(1.0, abs=1e-6)


def test_cknna_full_neighbourhood_equals_unbiased_cka():
    a, b = _features(60, seed=14)
    assert M.cknna(a, b, topk=59) == pytest.approx(M.unbiased_cka(a, b), abs=1e-9)


def test_independent_features_near_chance():
    a = torch.randn(400, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    b = torch.randn(400, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert abs(M.cknna(a, b)) < 0.08 and M.mutual_knn(a, b) < 0.08


# ---------------------------------------------------------------------------------------- prepare_features
def test_prepare_features_l2_and_shapes():
    x = torch.randn(10, 3, 8, dtype=torch.float32) * 5
    y = M.prepare_features(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(10, 3))
    # the quantile is per sample over all its layers and dims, then averaged
    q = torch.quantile(x.abs().flatten(1), 0.95, dim=1).mean()
    z = M.prepare_features(x, l2=False)
    torch.testing.assert_close(z.abs().max(), q)
    assert torch.equal(M.prepare_features(x, l2=False, clip_quantile=None), x)


def test_prepare_features_chunked_quantile(monkeypatch):
    x = torch.randn(50, 40, dtype=torch.float64).exp()
    expected = M.prepare_features(x, l2=False)
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", 90)       # 2 rows per chunk
    torch.testing.assert_close(M.prepare_features(x, l2=False), expected, rtol=0, atol=1e-14)


# --------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call,match", [
    (lambda a, b: M.cknna(a, b[:-1]), "same samples"),
    (lambda a, b: M.cknna(a, b, topk=30), "N > topk"),
    (lambda a, b: M.cknna(a, b, topk=1), "topk must be"),
    (lambda a, b: M.mutual_knn(a, b, topk=0), "topk must be"),
    (lambda a, b: M.cycle_knn(a[0], b[0]), "2-D"),
    (lambda a, b: M.cka(a[None], b[None]), "2-D"),
    (lambda a, b: M.cka(a.long(), b), "floating"),
    (lambda a, b: M.cka(a.tolist(), b), "numpy"),
    (lambda a, b: M.cknna(a.index_fill(0, torch.tensor([3]), float("nan")), b), "NaN or inf"),
    (lambda a, b: M.mutual_knn(a, b.index_fill(1, torch.tensor([0]), float("inf"))), "NaN or inf"),
    (lambda a, b: M.unbiased_cka(a[:3], b[:3]), "at least 4"),
    (lambda a, b: M.cknna(a, b, chunk_size=0), "chunk_size"),
    (lambda a, b: M.prepare_features(a, clip_quantile=1.5), "clip_quantile"),
    (lambda a, b: M.prepare_features(a[0]), "N samples first"),
    (lambda a, b: M.bootstrap(M.cka, a, b, fraction=1.0), "fraction"),
    (lambda a, b: M.bootstrap(M.cka, a, b, n=1), "replicates"),
])
def test_bad_input_raises(call, match):
    a, b = _features(30, seed=15)
    with pytest.raises(MetricInputError, match=match):
        call(a, b)
    assert issubclass(MetricInputError, ValueError)


# ------------------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_contains_value_shrinks_and_is_seeded():
    widths = []
    for n in (120, 960):
        a, b = _features(n, 16, 12, seed=16, noise=1.0)
        value, low, high = M.bootstrap(functools.partial(M.cknna, topk=10), a, b, n=20, seed=0)
        assert value == pytest.approx(M.cknna(a, b, topk=10), abs=0)
        assert low < value < high
        widths.append(high - low)
    assert widths[1] < 0.6 * widths[0]
    a, b = _features(120, 16, 12, seed=16, noise=1.0)
    assert M.bootstrap(M.cka, a, b, n=10, seed=4) == M.bootstrap(M.cka, a, b, n=10, seed=4)
    assert M.bootstrap(M.cka, a, b, n=10, seed=4) != M.bootstrap(M.cka, a, b, n=10, seed=5)
