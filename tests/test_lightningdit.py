"""LightningDiT: its blocks, files, loss and sampler against hustvl/LightningDiT's own outputs (golden files from
``python -m tools.golden``, see tests/data/golden/README.md), its configs and a tiny training run."""
from pathlib import Path

import pytest
import torch

from repa_probe.checkpoint import CheckpointError, load_model, safe_load
from repa_probe.models import LightningDiT, ModelInputError, create_model, from_config, model_name
from repa_probe.objectives import FlowMatching
from repa_probe.sampling import SamplingError, sample
from repa_probe.sampling.flow import shift_time
from repa_probe.training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden"
TOL = dict(rtol=1e-5, atol=1e-5)
MODELS = ("lightningdit", "lightningdit_all")


def _golden(name: str):
    path = GOLDEN / name
    if not path.exists():
        pytest.fail(f"{path} missing: regenerate with the command in {GOLDEN / 'README.md'}")
    return torch.load(path, weights_only=True)


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", MODELS)
def test_official_state_dict_loads_with_heads_read_from_the_file_and_matches_their_forward(name):
    io = _golden(f"{name}_io.pt")
    model, info = load_model(GOLDEN / f"{name}_state_dict.pt")  # no num_heads: the RoPE table / q_norm tell it
    theirs = io["config"]
    assert isinstance(model, LightningDiT) and info.family == "LightningDiT" and info.time_convention == "sit"
    assert info.config["num_heads"] == theirs["num_heads"] and info.config["mlp_ratio"] == 4.0
    for ours, key in (("swiglu", "use_swiglu"), ("rmsnorm", "use_rmsnorm"), ("rope", "use_rope"),
                      ("qk_norm", "use_qknorm"), ("wo_shift", "wo_shift"), ("learn_sigma", "learn_sigma")):
        assert info.config[ours] == theirs[key], ours
    with torch.no_grad():
        out, _, hidden = model(io["x"], io["t"], io["y"], return_hidden=True)
    _close(out, io["out"], f"{name} output")
    _close(torch.stack(hidden), io["hidden"], f"{name} hidden states")
    _close(torch.stack(model.forward_features(io["x"], io["t"], io["y"], layers=[0, -1])), io["hidden"][[0, -1]],
           f"{name} forward_features")
    # a freshly built model has exactly their keys, shapes, RoPE tables and pos_embed
    official = _golden(f"{name}_state_dict.pt")
    fresh = from_config(info.config).state_dict()
    assert {k: tuple(v.shape) for k, v in fresh.items()} == {k: tuple(v.shape) for k, v in official.items()}
    for key in ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin"):
        torch.testing.assert_close(fresh[key], official[key], rtol=0, atol=1e-6)


def test_training_file_ema_and_their_config_dict(tmp_path):
    """``{model, ema, opt, config}`` (their train.py; step only in the file name): EMA taken, SiT time."""
    sd = _golden("lightningdit_state_dict.pt")
    io = _golden("lightningdit_io.pt")
    online = {k: v + 0.5 if v.is_floating_point() and not k.startswith("feat_rope") else v for k, v in sd.items()}
    config = {"model": {"model_type": "LightningDiT-XL/1", "use_swiglu": True, "use_rope": True, "in_chans": 8},
              "data": {"num_classes": 10, "latent_norm": True}, "transport": {"use_cosine_loss": True}}
    path = tmp_path / "0080000.pt"
    torch.save({"model": {f"module.{k}": v for k, v in online.items()}, "ema": sd, "opt": {}, "config": config}, path)
    model, info = load_model(path)
    assert (info.source_format, info.ema, info.step, info.time_convention) == ("official-training", True, 80000, "sit")
    with torch.no_grad():
        _close(model(io["x"], io["t"], io["y"])[0], io["out"], "EMA weights")
    assert load_model(path, prefer_ema=False)[1].ema is False
    with pytest.raises(CheckpointError, match="contradicts the RoPE table"):
        load_model(path, num_heads=2)
    # with every switch off the layout is a SiT one: their config dict still says SiT's time
    plain = {k: v for k, v in _golden("sit_state_dict.pt").items()}
    torch.save({"model": plain, "ema": plain, "opt": {}, "config": config}, path)
    assert load_model(path, num_heads=2)[1].time_convention == "sit"


def test_released_xl1_layout_and_name():
    with torch.device("meta"):
        model = create_model("LightningDiT-XL/1", input_size=16, in_channels=32)
    sd = model.state_dict()
    assert tuple(sd["blocks.0.mlp.w12.weight"].shape) == (6144, 1152)
    assert tuple(sd["blocks.0.mlp.w3.weight"].shape) == (1152, 3072)
    assert tuple(sd["feat_rope.freqs_cos"].shape) == (256, 72) and tuple(sd["blocks.27.norm2.weight"].shape) == (1152,)
    assert tuple(sd["final_layer.linear.weight"].shape) == (32, 1152) and "final_layer.norm_final.weight" in sd
    assert model_name(model.config) == "LightningDiT-XL/1"
    with pytest.raises(ModelInputError, match="swiglu"):
        create_model("SiT-S/2", swiglu=True)
    with pytest.raises(ModelInputError, match="divisible by 4"):
        create_model("LightningDiT-S/2", hidden_size=36, num_heads=6)
    with pytest.raises(ModelInputError, match="cls_token_dim"):  # REG's extra token has no RoPE row
        create_model("LightningDiT-S/2", depth=1, cls_token_dim=8)


def test_loss_terms_match_their_transport_with_cosine_loss():
    """Their t is SiT time (t = 0 noise) and their output u = -v: our terms at t = 1 - t_sit on -u."""
    g = _golden("lightningdit_loss.pt")
    flow = FlowMatching(weighting="lognormal", cosine_weight=1.0)
    t = 1.0 - g["t"]
    _close(flow.add_noise(g["x1"], t, g["noise"]), g["x_t"], "x_t in REPA time")
    model, _ = load_model(GOLDEN / "lightningdit_state_dict.pt")
    with torch.no_grad():
        u = model(g["x_t"], g["t"], g["y"])[0]
    _close(u, g["model_out"], "model output inside their loss")
    for source, out in (("their output", g["model_out"]), ("our model", u)):
        terms = flow.loss(-out, g["x1"], g["x_t"], g["noise"], t)
        _close(terms["denoise"], g["loss"], f"MSE ({source})")
        _close(terms["cos_loss"], g["cos_loss"], f"cosine term ({source})")
        _close(terms["loss"], g["loss"] + g["cos_loss"], f"total ({source}; their train.py adds the means)")
    assert (g["cos_loss"] - 1).abs().max() > 0.02  # a real direction term, not a degenerate 1


def test_lognormal_time_is_their_logit_normal():
    t = FlowMatching(weighting="lognormal").sample_t(40000, torch.Generator().manual_seed(0))
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    expected = torch.sigmoid(torch.distributions.Normal(0.0, 1.0).icdf(q))  # t_sit = sigmoid(n) has the same law
    torch.testing.assert_close(torch.quantile(t, q), expected, atol=0.01, rtol=0)


def test_sampler_matches_their_ode_with_shift_and_cfg_interval(tmp_path):
    g = _golden("sampling_lightningdit.pt")
    torch.save(g["state_dict"], tmp_path / "model.pt")
    model, info = load_model(tmp_path / "model.pt")
    assert info.time_convention == "sit"
    for name, case in g["cases"].items():
        kw = dict(method="euler", steps=case["num_steps"] - 1, cfg_scale=case["cfg_scale"],
                  guidance_interval=(0.0, 1.0 - case["interval_start"]), timestep_shift=case["shift"])
        out = sample(model, g["noise"], g["labels"], **kw)
        _close(out, case["out"], f"sampler case {name}")
        if case["cfg_scale"] > 1:  # their forward_with_cfg guides channels 0-2 only; guiding all 8 differs
            assert not torch.allclose(sample(model, g["noise"], g["labels"], cfg_channels="all", **kw), case["out"],
                                      **TOL)
    with pytest.raises(SamplingError, match="timestep shift"):
        sample(model, g["noise"], g["labels"], method="sde", steps=4, timestep_shift=0.3)


def test_shift_is_their_map_in_repa_time():
    u = torch.linspace(0, 1, 11, dtype=torch.float64)  # their SiT-time grid
    s = 0.3
    theirs = s * u / (1 + (s - 1) * u)
    torch.testing.assert_close(1 - shift_time(1 - u, s), theirs, rtol=0, atol=1e-12)
    assert torch.equal(shift_time(u, 0.0), u)


def test_shipped_config_is_their_recipe():
    cfg = load_config(str(ROOT / "configs/lightningdit_xl.yaml"))
    assert cfg.model.name == "LightningDiT-XL/1" and cfg.data.resolution == 256
    assert (cfg.objective.weighting, cfg.objective.cosine_weight, cfg.objective.path) == ("lognormal", 1.0, "linear")
    assert (cfg.train.batch_size, cfg.optim.lr, cfg.optim.betas, cfg.optim.grad_clip) == (1024, 2e-4, [0.9, 0.95], 0.0)
    assert cfg.train.ema_decay == 0.9999 and cfg.optim.weight_decay == 0.0


def test_tiny_config_trains_with_repa_and_loads_back(tmp_path):
    from repa_probe.training import rundir
    from repa_probe.training.trainer import train

    cfg = load_config(str(ROOT / "configs/lightningdit_tiny.yaml"),
                      [f"run.out_dir={tmp_path}", "train.steps=2", "train.ckpt_every=2", "train.log_every=1",
                       "data.num_samples=32", "train.batch_size=8", "train.tensorboard=false", "model.depth=2",
                       "model.hidden_size=32", "repa.projector_dim=16", "repa.encoder_depth=1"])
    run = train(cfg)
    rows = rundir.read_metrics(run)
    assert {"denoise", "cos_loss", "repa", "cos"} <= set(rows[-1])
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["denoise"] + rows[-1]["cos_loss"], rel=1e-5)
    model, info = load_model(run / "checkpoints" / "0000002.pt")
    assert isinstance(model, LightningDiT) and info.time_convention == "repa" and info.ema
    assert info.config["rope"] and info.config["swiglu"] and info.config["z_dims"]
    assert "feat_rope.freqs_cos" in safe_load(run / "checkpoints" / "0000002.pt")["ema"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, zs = model(x, torch.rand(2), torch.tensor([0, 1]))
    assert out.shape == x.shape and zs[0].shape[1] == model.num_tokens


def test_alignment_runs_on_their_file_in_their_time():
    """The analyses' resolver takes their file as it is: SiT time, the VAE by --vae, the latent size from it."""
    from repa_probe.analysis.alignment.run import alignment_table
    from repa_probe.analysis.core.inputs import DataSource, build_analysis_dataset, load_checkpoints
    from repa_probe.analysis.core.options import AlignmentOptions
    from repa_probe.encoders.target import load_encoder

    opts = AlignmentOptions(timesteps=[0.0, 1.0], topk=3, batch_size=8, progress=False, vae="random:tiny")
    entry = load_checkpoints([GOLDEN / "lightningdit_all_state_dict.pt"], opts)[0]
    assert (entry.info.time_convention, entry.latent_channels, entry.resolution) == ("sit", 4, 64)
    source = DataSource("shapes", None, entry.resolution, 0, 4, entry.vae_name, entry.vae, False)
    dataset, _ = build_analysis_dataset(source, "val", 12)
    torch.manual_seed(0)
    encoder = load_encoder("tiny_vit", pretrained=False, resolution=entry.resolution)
    rows = alignment_table(entry.model, entry.objective, dataset, encoder, opts, vae=entry.vae)
    assert len(rows) == 3 * 2 and all(-1 <= r["value"] <= 1 for r in rows)


def test_sample_cli_takes_their_sampler_settings(tmp_path, capsys):
    import json

    import numpy as np

    from analysis.sample import main as sample_main

    base = ["--ckpt", str(GOLDEN / "lightningdit_all_state_dict.pt"), "--num-samples", "2", "--method", "euler",
            "--steps", "3", "--cfg-scale", "6.7", "--guidance-high", "0.875", "--vae", "random:tiny", "-q"]
    assert sample_main([*base, "--out", str(tmp_path / "shift"), "--timestep-shift", "0.3"]) == 0
    assert sample_main([*base, "--out", str(tmp_path / "plain")]) == 0
    record = json.loads((tmp_path / "shift" / "sampling.json").read_text())
    assert (record["timestep_shift"], record["time_convention"], record["cfg_channels"]) == (0.3, "sit", "auto")
    shifted, plain = (np.load(tmp_path / d / "samples.npz")["arr_0"] for d in ("shift", "plain"))
    assert shifted.shape == plain.shape == (2, 64, 64, 3) and not np.array_equal(shifted, plain)
    with pytest.raises(SystemExit):
        sample_main([*base[:5], "sde", "--out", str(tmp_path / "sde"), "--timestep-shift", "0.3", "--vae",
                     "random:tiny"])
    assert "--timestep-shift" in capsys.readouterr().err


def test_their_latent_statistics_normalise_the_vae_latents(tmp_path):
    """LightningDiT's latents_stats.pt {mean, std} (1, C, 1, 1) in a VAE folder: the model sees (z - mean) / std
    and samples decode from z * std + mean (their inference.py)."""
    from diffusers import AutoencoderKL

    from repa_probe.encoders.vae import RANDOM_VAES, load_vae

    torch.manual_seed(0)
    AutoencoderKL(**RANDOM_VAES["tiny-f16d32"]).save_pretrained(tmp_path / "vavae")
    mean, std = torch.randn(1, 32, 1, 1), torch.rand(1, 32, 1, 1) + 0.5
    torch.save({"mean": mean, "std": std}, tmp_path / "vavae" / "latents_stats.pt")
    vae = load_vae(tmp_path / "vavae")
    raw = torch.randn(2, 32, 4, 4)
    torch.testing.assert_close(vae.normalize(raw), (raw - mean) / std)
    torch.testing.assert_close(vae.denormalize(vae.normalize(raw)), raw)
    assert (vae.latent_channels, vae.downsample_factor) == (32, 16)
