"""Tests for repa_probe.objectives: flow matching, REPA loss and helpers (CPU, fast; DDPM: test_ddpm.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from repa_probe.models import create_model
from repa_probe.objectives import (FlowMatching, ObjectiveError, drop_labels, match_token_grid, repa_loss,
                                   repa_time_to_sit, repa_velocity_to_sit, sit_time_to_repa, sit_velocity_to_repa)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


# ============================================================================ flow matching
@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_flow_endpoints(path):
    fm = FlowMatching(path=path)
    x0, eps = _randn(3, 4, 6, 6, seed=1), _randn(3, 4, 6, 6, seed=2)
    torch.testing.assert_close(fm.add_noise(x0, torch.zeros(3), eps), x0)
    torch.testing.assert_close(fm.add_noise(x0, torch.ones(3), eps), eps)


def test_flow_linear_target_and_mixture():
    fm = FlowMatching("linear")
    x0, eps = _randn(4, 2, 5, 5, seed=1), _randn(4, 2, 5, 5, seed=2)
    t = torch.tensor([0.0, 0.25, 0.5, 0.9])
    torch.testing.assert_close(fm.target(x0, eps, t), eps - x0)
    expected = torch.stack([(1 - ti) * x0[i] + ti * eps[i] for i, ti in enumerate(t.tolist())])
    torch.testing.assert_close(fm.add_noise(x0, t, eps), expected)


def test_flow_cosine_interpolant_identities():
    fm = FlowMatching("cosine")
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    a, s, da, ds = fm.interpolant(t)
    torch.testing.assert_close(a ** 2 + s ** 2, torch.ones_like(t))
    h = 1e-6
    a_hi, s_hi, _, _ = fm.interpolant(t + h)
    a_lo, s_lo, _, _ = fm.interpolant(t - h)
    torch.testing.assert_close(da, (a_hi - a_lo) / (2 * h), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(ds, (s_hi - s_lo) / (2 * h), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_flow_target_is_time_derivative_of_xt(path):
    fm = FlowMatching(path)
    x0, eps = _randn(2, 3, 4, 4, seed=1, dtype=torch.float64), _randn(2, 3, 4, 4, seed=2, dtype=torch.float64)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    h = 1e-6
    fd = (fm.add_noise(x0, t + h, eps) - fm.add_noise(x0, t - h, eps)) / (2 * h)
    torch.testing.assert_close(fm.target(x0, eps, t), fd, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_flow_lognormal_and_uniform_sampling(path):
    n = 20000
    t = FlowMatching(path, weighting="lognormal").sample_t(n, _gen(3))
    assert t.dtype == torch.float32 and t.shape == (n,)
    assert (t > 0).all() and (t < 1).all()
    # sigma = exp(N(0,1)) has median 1, which both maps send to t = 0.5.
    assert abs(t.median().item() - 0.5) < 0.02
    # invert the map back to log sigma, which must be N(0, 1)
    log_sigma = torch.logit(t.double()) if path == "linear" else torch.log(torch.tan(t.double() * math.pi / 2))
    assert abs(log_sigma.mean().item()) < 0.03 and abs(log_sigma.std().item() - 1.0) < 0.03
    u = FlowMatching(path).sample_t(n, _gen(3))
    assert (u >= 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.02 and abs(u.var().item() - 1 / 12) < 0.005
    torch.testing.assert_close(FlowMatching(path).sample_t(5, _gen(7)), FlowMatching(path).sample_t(5, _gen(7)))


def test_flow_loss_values_and_learned_sigma_channels():
    fm = FlowMatching("linear")
    x0, eps = _randn(3, 4, 4, 4, seed=1), _randn(3, 4, 4, 4, seed=2)
    t = torch.tensor([0.1, 0.5, 0.8])
    xt = fm.add_noise(x0, t, eps)
    out = _randn(3, 4, 4, 4, seed=5)
    terms = fm.loss(out, x0, xt, eps, t)
    expected = ((out - (eps - x0)) ** 2).reshape(3, -1).mean(dim=1)
    torch.testing.assert_close(terms["loss"], expected)
    torch.testing.assert_close(terms["denoise"], expected)
    # a perfect prediction in the first C channels gives 0 whatever the extra (learned-sigma) channels hold
    perfect = torch.cat([eps - x0, 100 * _randn(3, 4, 4, 4, seed=6)], dim=1)
    assert fm.loss(perfect, x0, xt, eps, t)["loss"].abs().max() < 1e-6
    with pytest.raises(ObjectiveError, match="channels"):
        fm.loss(out[:, :3], x0, xt, eps, t)
    with pytest.raises(ObjectiveError):
        fm.add_noise(x0, torch.zeros(2), eps)


def test_flow_loss_is_float32_for_half_outputs():
    fm = FlowMatching()
    x0, eps = _randn(2, 4, 4, 4, seed=1), _randn(2, 4, 4, 4, seed=2)
    t = torch.tensor([0.2, 0.6])
    out = _randn(2, 4, 4, 4, seed=3).half()
    terms = fm.loss(out, x0, fm.add_noise(x0, t, eps), eps, t)
    assert terms["loss"].dtype == torch.float32
    torch.testing.assert_close(terms["loss"], ((out.float() - (eps - x0)) ** 2).mean(dim=(1, 2, 3)))


def test_sit_conversions_match_official_sit_linear_path():
    fm = FlowMatching("linear")
    x0, eps = _randn(3, 2, 4, 4, seed=1), _randn(3, 2, 4, 4, seed=2)
    t_sit = torch.tensor([0.1, 0.4, 0.95])
    sit_xt = t_sit.view(-1, 1, 1, 1) * x0 + (1 - t_sit.view(-1, 1, 1, 1)) * eps  # SiT ICPlan: t=0 noise
    sit_u = x0 - eps
    t = sit_time_to_repa(t_sit)
    torch.testing.assert_close(fm.add_noise(x0, t, eps), sit_xt)
    torch.testing.assert_close(sit_velocity_to_repa(sit_u), fm.target(x0, eps, t))
    torch.testing.assert_close(repa_time_to_sit(t), t_sit)
    torch.testing.assert_close(repa_velocity_to_sit(fm.target(x0, eps, t)), sit_u)


def test_flow_model_time_and_options():
    fm = FlowMatching()
    assert fm.model_time(torch.tensor([0.3])).item() == pytest.approx(0.3)
    for kw in (dict(path="vp"), dict(prediction="eps"), dict(weighting="sigmoid")):
        with pytest.raises(ObjectiveError):
            FlowMatching(**kw)


# ============================================================================ REPA loss
def test_repa_loss_parallel_orthogonal_antiparallel():
    z = _randn(2, 5, 8, seed=1)
    scale = torch.rand(2, 5, 1, generator=_gen(2)) * 10 + 0.1  # per-token positive scale
    loss, cos = repa_loss([z * scale], [z])
    assert loss.item() == pytest.approx(-1.0, abs=1e-6) and cos.item() == pytest.approx(1.0, abs=1e-6)
    assert repa_loss([-3 * z], [z])[0].item() == pytest.approx(1.0, abs=1e-6)
    e = torch.eye(8)
    a, b = e[:4].expand(2, 4, 8), e[4:].expand(2, 4, 8)
    assert abs(repa_loss([a], [b])[0].item()) < 1e-7
    # averaged over encoders: +1 and -1 cancel
    assert abs(repa_loss([z, -z], [z, z])[0].item()) < 1e-6


def test_repa_loss_matches_cosine_similarity_and_grad():
    zt = [_randn(3, 6, 10, seed=1).requires_grad_(), _randn(3, 6, 4, seed=2).requires_grad_()]
    zs = [_randn(3, 6, 10, seed=3), _randn(3, 6, 4, seed=4)]
    loss, cos = repa_loss(zt, zs)
    expected = -(F.cosine_similarity(zt[0], zs[0], dim=-1).mean() + F.cosine_similarity(zt[1], zs[1], dim=-1).mean()) / 2
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(cos, -expected.detach())
    assert loss.dtype == torch.float32 and not cos.requires_grad
    loss.backward()
    assert all(z.grad is not None and z.grad.abs().max() > 0 for z in zt)


def test_repa_loss_fp16_is_fp32_exact_and_finite():
    zt, zs = 300 * _randn(2, 16, 64, seed=1), 300 * _randn(2, 16, 64, seed=2)
    zt[0, 0, :] = 300.0
    zs[0, 0, :] = 300.0
    zt16, zs16 = zt.half(), zs.half()
    assert torch.isinf((zt16 * zt16).sum(-1)).any()  # a naive fp16 norm overflows here
    loss16, _ = repa_loss([zt16.requires_grad_()], [zs16])
    loss32, _ = repa_loss([zt16.float()], [zs16.float()])
    assert torch.isfinite(loss16) and loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), abs=1e-6)
    loss16.backward()
    assert torch.isfinite(zt16.grad if zt16.grad is not None else torch.zeros(1)).all()


def test_repa_loss_errors_say_what_to_set():
    z = _randn(2, 16, 8)
    with pytest.raises(ObjectiveError, match="z_dims"):
        repa_loss([z, z], [z])
    with pytest.raises(ObjectiveError, match="match_token_grid"):
        repa_loss([z], [_randn(2, 64, 8)])
    with pytest.raises(ObjectiveError, match=r"z_dims\[0\]"):
        repa_loss([z], [_randn(2, 16, 12)])
    with pytest.raises(ObjectiveError):
        repa_loss([], [])
    with pytest.raises(ObjectiveError, match="batch"):
        repa_loss([z], [_randn(3, 16, 8)])


def test_match_token_grid():
    z = _randn(2, 64, 5)
    assert match_token_grid(z, 8) is z
    assert match_token_grid(z, 4).shape == (2, 16, 5)
    assert match_token_grid(z, 16).shape == (2, 256, 5)
    assert match_token_grid(z.half(), 4).dtype == torch.float16
    # raster order: a field that depends on the row only stays row-only and increasing after resizing
    rows = torch.arange(8.0).view(1, 8, 1, 1).expand(1, 8, 8, 1).reshape(1, 64, 1)
    for g in (4, 16):
        r = match_token_grid(rows, g).view(g, g)
        torch.testing.assert_close(r, r[:, :1].expand(g, g))
        assert (r[1:, 0] > r[:-1, 0]).all()
    # downsampling by 2 with antialias: bilinear-antialias on a 2x factor averages 2x2 neighbourhoods inside
    img = _randn(1, 1, 8, 8, seed=3)
    tok = img.permute(0, 2, 3, 1).reshape(1, 64, 1)
    ref = F.interpolate(img, size=(4, 4), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(match_token_grid(tok, 4), ref.permute(0, 2, 3, 1).reshape(1, 16, 1))
    with pytest.raises(ObjectiveError, match="CLS"):
        match_token_grid(_randn(2, 65, 5), 8)
    with pytest.raises(ObjectiveError):
        match_token_grid(z, 0)


def test_drop_labels():
    y = torch.randint(0, 1000, (20000,), generator=_gen(1))
    out = drop_labels(y, 0.1, 1000, _gen(2))
    dropped = out == 1000
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    assert torch.equal(out[~dropped], y[~dropped]) and y.max() < 1000  # y itself untouched
    assert torch.equal(drop_labels(y, 0.1, 1000, _gen(2)), out)
    assert torch.equal(drop_labels(y, 0.0, 1000), y)
    assert (drop_labels(y, 1.0, 7) == 7).all()
    for args in ((y.float(), 0.1, 1000), (y, 1.5, 1000), (y, 0.1, -1), (y.view(100, 200), 0.1, 1000)):
        with pytest.raises(ObjectiveError):
            drop_labels(*args)


# ============================================================================ gradient flow through a REPA model
def test_repa_gradient_reaches_only_blocks_up_to_encoder_depth():
    torch.manual_seed(0)
    enc_depth = 2
    model = create_model("SiT-S/2", depth=4, encoder_depth=enc_depth, hidden_size=32, num_heads=2,
                                input_size=8, in_channels=4, z_dims=(16,), projector_dim=32, num_classes=10)
    with torch.no_grad():  # adaLN-Zero init zeroes many grads; perturb so that every path is live
        for layer in [b.adaLN_modulation[-1] for b in model.blocks] + [model.final_layer.adaLN_modulation[-1],
                                                                        model.final_layer.linear]:
            layer.weight.normal_(0, 0.05)
            layer.bias.normal_(0, 0.05)
    fm = FlowMatching()
    x0, eps = _randn(2, 4, 8, 8, seed=1), _randn(2, 4, 8, 8, seed=2)
    t = fm.sample_t(2, _gen(3))
    out, zs_tilde = model(fm.add_noise(x0, t, eps), fm.model_time(t), torch.tensor([1, 2]))
    assert len(zs_tilde) == 1 and zs_tilde[0].shape == (2, model.num_tokens, 16)
    target = _randn(2, 16, 16, seed=4)
    proj_loss, _ = repa_loss(zs_tilde, [match_token_grid(target, model.grid_size)])
    denoise = fm.loss(out, x0, None, eps, t)["loss"].mean()

    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    names = list(params)

    def grads(loss):
        gs = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
        return {n: (torch.zeros_like(params[n]) if g is None else g) for n, g in zip(names, gs)}

    g = grads(proj_loss)
    for n, v in g.items():
        nonzero = v.abs().max().item() > 0
        if n.startswith("projectors.") or n.startswith("x_embedder.") or n.startswith("t_embedder."):
            assert nonzero, n
        elif n.startswith("blocks."):
            assert nonzero == (int(n.split(".")[1]) < enc_depth), n
        elif n.startswith("final_layer."):
            assert not nonzero, n
    g = grads(denoise)
    assert all(v.abs().max() == 0 for n, v in g.items() if n.startswith("projectors.")), "denoise reached projector"
    assert all(g[n].abs().max() > 0 for n in names if n.startswith("blocks.3.") or n.startswith("final_layer."))
