"""Tests for repa_probe.objectives.ddpm: DiT's Gaussian diffusion (betas, q_sample, posterior, learned-range
variance, L_simple + L_vlb) against closed forms (CPU, fast)."""

from __future__ import annotations

import math

import pytest
import torch

from repa_probe.objectives import GaussianDiffusion, ObjectiveError, discretized_gaussian_log_likelihood, normal_kl


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _abar(betas: list[float]) -> list[float]:
    out, p = [], 1.0
    for b in betas:
        p *= 1.0 - b
        out.append(p)
    return out


@pytest.mark.parametrize("T", [1000, 250])
def test_ddpm_betas_endpoints(T):
    gd = GaussianDiffusion(num_timesteps=T)
    betas = gd.tables["betas"]
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert betas[0].item() == pytest.approx(1e-4 * 1000 / T, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02 * 1000 / T, rel=1e-12)
    assert (betas[1:] > betas[:-1]).all()


def test_ddpm_q_sample_closed_form():
    T = 1000
    gd = GaussianDiffusion(T)
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    abar = _abar(betas)
    x0, eps = _randn(4, 3, 4, 4, seed=1), _randn(4, 3, 4, 4, seed=2)
    t = torch.tensor([0, 10, 500, 999])
    xt = gd.add_noise(x0, t, eps)
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(xt[i], math.sqrt(abar[ti]) * x0[i] + math.sqrt(1 - abar[ti]) * eps[i])
    assert xt.dtype == x0.dtype


def test_ddpm_posterior_matches_gaussian_product():
    """q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0): precision and mean from the Gaussian product rule."""
    T = 1000
    gd = GaussianDiffusion(T)
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    abar = _abar(betas)
    x0, xt = _randn(3, 2, 3, 3, seed=1), _randn(3, 2, 3, 3, seed=2)
    t = torch.tensor([1, 300, 999])
    mean, var, log_var = gd.q_posterior_mean_variance(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        a_t, prev = 1 - betas[ti], abar[ti - 1]
        precision = a_t / betas[ti] + 1 / (1 - prev)
        expect_mean = (math.sqrt(a_t) / betas[ti] * xt[i] + math.sqrt(prev) / (1 - prev) * x0[i]) / precision
        torch.testing.assert_close(mean[i], expect_mean, atol=1e-5, rtol=1e-4)
        assert var[i].flatten()[0].item() == pytest.approx(1 / precision, rel=1e-5)
        assert log_var[i].flatten()[0].item() == pytest.approx(math.log(1 / precision), rel=1e-5)
    # at t=0 the posterior is a point mass on x0; its log variance is clipped to that of t=1
    mean0, var0, log_var0 = gd.q_posterior_mean_variance(x0, xt, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(mean0, x0)
    assert var0.abs().max() == 0
    _, var1, _ = gd.q_posterior_mean_variance(x0, xt, torch.ones(3, dtype=torch.long))
    torch.testing.assert_close(log_var0, var1.log())


def test_normal_kl():
    m, lv = _randn(10, seed=1), _randn(10, seed=2)
    assert normal_kl(m, lv, m, lv).abs().max() < 1e-6
    m2, lv2 = _randn(10, seed=3), _randn(10, seed=4)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m, (0.5 * lv).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m, lv, m2, lv2), ref)


def test_discretized_likelihood():
    values = torch.arange(256, dtype=torch.float32) / 127.5 - 1.0  # every 8-bit level in [-1, 1]
    mean = torch.full_like(values, 0.1)
    log_scale = torch.full_like(values, math.log(0.2))
    total = discretized_gaussian_log_likelihood(values, mean, log_scale).exp().sum()
    assert total.item() == pytest.approx(1.0, abs=2e-3)  # a proper distribution over the 256 bins
    x = torch.full((5,), 0.3)
    means = torch.tensor([-0.2, 0.0, 0.1, 0.2, 0.3])
    nll = -discretized_gaussian_log_likelihood(x, means, torch.full((5,), math.log(0.1)))
    assert (nll[1:] < nll[:-1]).all()


def _ddpm_setup(T=1000, seed=0):
    gd = GaussianDiffusion(T)
    x0 = (torch.randint(0, 256, (4, 3, 4, 4), generator=_gen(seed)) / 127.5 - 1.0)
    eps = _randn(4, 3, 4, 4, seed=seed + 1)
    t = torch.tensor([0, 1, 400, T - 1])
    return gd, x0, eps, t, gd.add_noise(x0, t, eps)


def test_ddpm_vb_zero_at_true_posterior():
    gd, x0, eps, t, xt = _ddpm_setup()
    # eps = true noise -> predicted mean is the posterior mean; var value -1 -> log variance = posterior's
    out = torch.cat([eps, -torch.ones_like(eps)], dim=1)
    vb = gd.vb_terms_bpd(out, x0, xt, t)
    assert vb[1:].abs().max() < 1e-4
    # t = 0 uses the decoder NLL instead; it must be positive and equal the bits-per-dim NLL
    p = gd.p_mean_variance(out, xt, t)
    nll0 = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])[0].mean() / math.log(2)
    assert vb[0].item() == pytest.approx(nll0.item(), rel=1e-6) and vb[0] > 0
    torch.testing.assert_close(p["pred_x0"], x0, atol=1e-3, rtol=0)
    # a wrong variance (beta_t instead of beta~_t, which differ most at small t) or a wrong mean costs bits
    wrong_var = torch.cat([eps, torch.ones_like(eps)], dim=1)
    assert gd.vb_terms_bpd(wrong_var, x0, xt, t)[1] > 1e-2
    wrong_mean = torch.cat([eps + 0.5, -torch.ones_like(eps)], dim=1)
    assert (gd.vb_terms_bpd(wrong_mean, x0, xt, t)[1:] > 1e-3).all()


def test_ddpm_learned_range_interpolates_log_variance():
    gd, x0, eps, t, xt = _ddpm_setup()
    t = torch.tensor([5, 5, 5, 5])
    v = torch.tensor([-1.0, 0.0, 0.5, 1.0]).view(4, 1, 1, 1).expand_as(eps)
    p = gd.p_mean_variance(torch.cat([eps, v], dim=1), xt, t)
    lo, hi = math.log(gd.tables["posterior_variance"][5].item()), math.log(gd.tables["betas"][5].item())
    got = p["log_variance"][:, 0, 0, 0]
    torch.testing.assert_close(got, torch.tensor([lo, (lo + hi) / 2, 0.25 * lo + 0.75 * hi, hi]))


def test_ddpm_hybrid_loss_terms_and_gradient_split():
    gd, x0, eps, t, xt = _ddpm_setup()
    out = _randn(4, 6, 4, 4, seed=9)
    out[:, 3:] = out[:, 3:].tanh()
    out.requires_grad_(True)
    terms = gd.loss(out, x0, xt, eps, t)
    assert set(terms) == {"loss", "mse", "vb"} and all(v.shape == (4,) for v in terms.values())
    torch.testing.assert_close(terms["mse"], ((out[:, :3] - eps) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    g_vb, = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert g_vb[:, :3].abs().max() == 0 and g_vb[:, 3:].abs().max() > 0  # vb trains only the variance
    g_mse, = torch.autograd.grad(terms["mse"].sum(), out)
    assert g_mse[:, 3:].abs().max() == 0 and g_mse[:, :3].abs().max() > 0


def test_ddpm_without_learned_sigma_and_shape_errors():
    _, x0, eps, t, xt = _ddpm_setup()
    gd = GaussianDiffusion(1000, learn_sigma=False)
    out = _randn(4, 3, 4, 4, seed=9)
    terms = gd.loss(out, x0, xt, eps, t)
    assert set(terms) == {"loss", "mse"}
    torch.testing.assert_close(terms["loss"], ((out - eps) ** 2).mean(dim=(1, 2, 3)))
    with pytest.raises(ObjectiveError, match="learn_sigma"):
        gd.loss(torch.cat([out, out], 1), x0, xt, eps, t)
    with pytest.raises(ObjectiveError, match="learn_sigma"):
        GaussianDiffusion(1000).loss(out, x0, xt, eps, t)
    with pytest.raises(ObjectiveError, match="integer"):
        gd.add_noise(x0, t.float(), eps)


def test_ddpm_sample_t_and_model_time():
    gd = GaussianDiffusion(1000)
    t = gd.sample_t(5000, _gen(1))
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999 and t.float().std() > 250
    assert torch.equal(gd.model_time(t), t)
    with pytest.raises(ObjectiveError):
        GaussianDiffusion(1000, beta_schedule="cosine")
