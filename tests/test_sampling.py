"""Samplers: the official samplers' outputs (golden files), the Gaussian toy of the facts file, CFG, errors."""
from pathlib import Path

import pytest
import torch

from repa_probe.checkpoint import load_model, safe_load
from repa_probe.models import DiffusionTransformer
from repa_probe.sampling import SamplingError, sample
from repa_probe.sampling.ddpm import respaced, space_timesteps
from repa_probe.sampling.guidance import guided_output, make_guidance
from repa_probe.timesteps import convention_of

GOLDEN = Path(__file__).parent / "data" / "golden"
M, S = 1.5, 0.5  # Gaussian toy: data ~ N(m, s^2) per coordinate
X0 = torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=torch.float64).view(4, 1, 1, 1)

pytestmark = pytest.mark.usefixtures("one_thread")


class Toy(torch.nn.Module):
    """Exact fields of the Gaussian toy, as a ``family`` model on (B, 1, 1, 1) states (facts file §8)."""

    in_channels, input_size, num_classes = 1, 1, 10

    def __init__(self, family="REPA", var_value=0.0):
        super().__init__()
        self.family, self.var_value, self.calls = family, var_value, []
        self.time_convention = convention_of(family)  # what the sampler reads

    def forward(self, x, t, y):
        self.calls.append(x.shape[0])
        t = t.view(-1, 1, 1, 1).to(x.dtype)
        if self.family == "DiT":
            abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t.long()].to(x.dtype)
            eps = (1 - abar).sqrt() / (abar * S ** 2 + 1 - abar) * (x - abar.sqrt() * M)
            return torch.cat([eps, torch.full_like(eps, self.var_value)], 1), []
        ts = 1 - t if self.family == "REPA" else t  # SiT time: t = 0 noise
        v_sit = M + (ts * S ** 2 - (1 - ts)) / (ts ** 2 * S ** 2 + (1 - ts) ** 2) * (x - ts * M)
        return (-v_sit if self.family == "REPA" else v_sit), []


def _labels(n):
    return torch.zeros(n, dtype=torch.int64)


def _zero_noise(step, like):
    return torch.zeros_like(like)


@pytest.mark.parametrize("family", ["REPA", "SiT"])
@pytest.mark.parametrize("method, expected", [
    ("euler", [1.0146032617, 1.5, 1.9853967383, 2.4707934765]),
    ("heun", [1.0003190950, 1.5, 1.9996809050, 2.4993618100]),
])
def test_ode_pinned_values(family, method, expected):
    out = sample(Toy(family), X0, _labels(4), method=method, steps=50)
    assert torch.allclose(out.flatten(), torch.tensor(expected, dtype=torch.float64), atol=1e-9)


def test_heun_calls_the_model_twice_per_step_but_the_last():
    toy = Toy()
    sample(toy, X0, _labels(4), method="heun", steps=50)
    assert len(toy.calls) == 99


def test_sde_with_zero_noise_pinned_values():
    out = sample(Toy(), X0, _labels(4), method="sde", steps=250, generator=_zero_noise)
    assert torch.allclose(out.flatten(), torch.tensor([1.34997684, 1.5, 1.65002315, 1.80004631],
                                                      dtype=torch.float64), atol=1e-7)


def test_ddim_pinned_values():
    out = sample(Toy("DiT"), X0, _labels(4), method="ddim", steps=250)
    assert torch.allclose(out.flatten(), torch.tensor([1.00101817, 1.49529055, 1.98956293, 2.48383531],
                                                      dtype=torch.float64), atol=1e-7)


def test_sde_statistics():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 1, 1, 1, generator=g, dtype=torch.float64)
    out = sample(Toy(), z, _labels(20000), method="sde", steps=250, generator=g)
    assert abs(out.mean().item() - 1.5) < 0.01 and 0.48 <= out.std().item() <= 0.51


@pytest.mark.parametrize("var_value, std", [(-1.0, 0.485), (0.0, 0.494), (1.0, 0.506)])
def test_ddpm_statistics_with_learned_variance(var_value, std):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(20000, 1, 1, 1, generator=g, dtype=torch.float64)
    out = sample(Toy("DiT", var_value), z, _labels(20000), method="ddpm", steps=250, generator=g)
    assert abs(out.mean().item() - 1.5) < 0.01 and abs(out.std().item() - std) < 0.01


def test_respacing_pins():
    kept = space_timesteps(1000, 250)
    assert len(kept) == 250 and sum(kept) == 124875 and kept[-1] == 999 and {164, 169, 497, 502} <= set(kept)
    assert space_timesteps(1000, 50)[:5] == [0, 20, 41, 61, 82]
    process = respaced(1000, 250)
    assert process.timestep_map.tolist() == kept and process.num_timesteps == 250
    betas = process.tables["betas"]
    assert torch.allclose(betas[:3], torch.tensor([1.0e-4, 5.99066e-4, 9.17603e-4], dtype=torch.float64),
                          rtol=1e-5)
    assert abs(betas[-1].item() - 0.0775193) < 1e-7


# ----------------------------------------------------------------------------------- official samplers
def _golden(name, tmp_path):
    data = safe_load(GOLDEN / f"sampling_{name}.pt")
    torch.save(data["state_dict"], tmp_path / "m.pt")
    model, _ = load_model(tmp_path / "m.pt", time_convention=convention_of(data["family"]),
                          num_heads=data["num_heads"])
    return data, model


@pytest.mark.parametrize("name", ["repa", "dit", "sit"])
def test_matches_the_official_samplers(name, tmp_path):
    """REPA euler/heun/SDE, DiT ddpm/ddim (plain and forward_with_cfg), SiT's Euler SDE: same noise, same RNG
    draws (the official loop draws its per-step noise for ``noise_rows`` rows and uses the first B)."""
    data, model = _golden(name, tmp_path)
    for case, c in data["cases"].items():
        gen = None
        if "seed" in c:
            rng = torch.Generator().manual_seed(c["seed"])
            if data["family"] == "REPA":
                gen = rng
            else:
                def gen(step, like, rng=rng, rows=c["noise_rows"]):
                    return torch.randn((rows, *like.shape[1:]), generator=rng)[: like.shape[0]]
        out = sample(model, data["noise"], data["labels"], method=c["method"], steps=c["steps"],
                     cfg_scale=c["cfg_scale"], guidance_interval=(c["low"], c["high"]), generator=gen)
        scale = max(1.0, c["out"].abs().max().item())  # random DiT models predict x0 of size ~1e2
        err = (out.double() - c["out"]).abs().max().item()
        assert err <= 1e-5 * scale, f"{name}/{case}: max error {err:.3g} (scale {scale:.3g})"


# ---------------------------------------------------------------------------------------------- CFG
def _tiny(family="REPA", dropout=0.1, learn_sigma=False):
    torch.manual_seed(0)
    m = DiffusionTransformer(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                             num_classes=5, class_dropout_prob=dropout, learn_sigma=learn_sigma,
                             time_convention=convention_of(family))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def test_cfg_combination_and_three_channel_variant():
    m = _tiny("DiT", learn_sigma=True)
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([500, 500]), torch.tensor([1, 3])
    cond = m(x, t, y)[0].double()
    uncond = m(x, t, torch.full_like(y, 5))[0].double()
    g1 = make_guidance(m, 1.0, (0, 1), "all", 4)
    assert torch.allclose(guided_output(m, x, t, y, g1, True), cond, atol=1e-6)   # w = 1: conditional
    g3 = make_guidance(m, 4.0, (0, 1), "auto", 4)                                  # DiT default: 3 channels
    out = guided_output(m, x, t, y, g3, True)
    assert torch.allclose(out[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]), atol=1e-5)
    assert torch.allclose(out[:, 3:], cond[:, 3:], atol=1e-6)                      # channel 3 + variance: cond


def test_cfg_doubles_the_batch_only_inside_the_interval():
    toy = Toy()
    sample(toy, X0, _labels(4), method="euler", steps=10, cfg_scale=1.8, guidance_interval=(0.0, 0.7))
    # grid 1.0, 0.9, ..., 0.1: t <= 0.7 on 7 of the 10 steps (float64 linspace: 0.7 itself is included)
    assert toy.calls == [4] * 3 + [8] * 7
    toy.calls.clear()
    sample(toy, X0, _labels(4), method="euler", steps=10, cfg_scale=1.0)
    assert toy.calls == [4] * 10


def test_cfg_w1_equals_conditional_sampling():
    m = _tiny()
    z, y = torch.randn(3, 4, 4, 4), torch.tensor([0, 1, 2])
    a = sample(m, z, y, method="heun", steps=4)
    b = sample(m, z, y, method="heun", steps=4, cfg_scale=1.0 + 1e-12)  # guided path, w ~ 1
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="ddpm", steps=4), "does not apply to a flow model"),
    (dict(method="euler", steps=0), "steps must be"),
    (dict(method="euler", steps=2, cfg_scale=2.0, guidance_interval=(0.8, 0.2)), "guidance interval"),
    (dict(method="euler", steps=2, cfg_channels=7), "cfg channels"),
])
def test_bad_input_is_one_line(kwargs, match):
    with pytest.raises(SamplingError, match=match):
        sample(_tiny(), torch.randn(1, 4, 4, 4), torch.tensor([0]), **kwargs)


def test_errors_for_dit_methods_and_missing_null_class():
    with pytest.raises(SamplingError, match="does not apply to a DDPM"):
        sample(_tiny("DiT", learn_sigma=True), torch.randn(1, 4, 4, 4), torch.tensor([0]), method="euler", steps=2)
    with pytest.raises(SamplingError, match="null class"):
        sample(_tiny(dropout=0.0), torch.randn(1, 4, 4, 4), torch.tensor([0]), method="euler", steps=2,
               cfg_scale=1.5)


def test_ddpm_sampler_is_the_objectives_respaced_process(monkeypatch):
    """One source of the DDPM tables: respacing to all T steps is the training schedule itself, and every
    ancestral step goes through the objective's p_mean_variance (the learned-variance rule written once)."""
    from repa_probe.objectives.ddpm import GaussianDiffusion

    full, same = GaussianDiffusion(1000), respaced(1000, 1000)
    assert all(torch.allclose(full.tables[k], same.tables[k], rtol=1e-12, atol=0) for k in full.tables)
    calls = []
    original = GaussianDiffusion.p_mean_variance
    monkeypatch.setattr(GaussianDiffusion, "p_mean_variance",
                        lambda self, *a, **k: calls.append(self.num_timesteps) or original(self, *a, **k))
    z = torch.randn(4, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sample(Toy("DiT", 0.5), z, _labels(4), method="ddpm", steps=7, generator=torch.Generator().manual_seed(1))
    assert calls == [7] * 7


def test_a_sampler_object_is_the_keywords_and_not_both():
    from repa_probe.sampling import Sampler

    m, z, y = _tiny(), torch.randn(2, 4, 4, 4), torch.tensor([0, 3])
    spec = Sampler("sde", 4, cfg_scale=1.5, guidance_interval=(0.0, 0.7))
    a = sample(m, z, y, spec, generator=torch.Generator().manual_seed(3))
    b = sample(m, z, y, method="sde", steps=4, cfg_scale=1.5, guidance_interval=(0.0, 0.7),
               generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="not both"):
        sample(m, z, y, spec, steps=5)
