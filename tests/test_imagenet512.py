"""ImageNet 512 (REPA's SiT-XL/2 at 512 px): the config, REPA's 512 checkpoint layout (1024 tokens) loading and
sampling, and training plus the alignment analysis at 1024 tokens with an encoder on another token grid, at a
scale this CPU runs in seconds."""
import argparse
from pathlib import Path

import pytest
import torch

from repa_probe.checkpoint import load_model
from repa_probe.encoders.registry import default_input_size, resolve_encoder_name
from repa_probe.models import create_model
from repa_probe.sampling import sample
from repa_probe.training.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_config_is_repas_512_recipe():
    cfg = load_config(str(ROOT / "configs/repa_sit_512.yaml"))
    base = load_config(str(ROOT / "configs/repa_sit.yaml"))
    assert cfg.data.resolution == 512 and base.data.resolution == 256
    for section in ("model", "objective", "repa", "optim"):  # the 256 recipe otherwise
        assert getattr(cfg, section) == getattr(base, section), section
    assert cfg.train.batch_size == base.train.batch_size and cfg.encoder.input_size is None
    spec = resolve_encoder_name(cfg.encoder.name)
    enc_side = default_input_size(spec, cfg.data.resolution)
    with torch.device("meta"):
        model = create_model(cfg.model.name, input_size=cfg.data.resolution // 8)  # SD-VAE: f8
    assert enc_side == 448 and enc_side // spec.patch_size == model.grid_size == 32 and model.num_tokens == 1024


def _repa_512_layout(tmp_path):
    """A small SiT in REPA's layout on 64x64 latents (1024 tokens), two of its file formats."""
    torch.manual_seed(0)
    model = create_model("SiT-S/2", depth=2, hidden_size=32, num_heads=2, input_size=64, z_dims=(24,),
                         encoder_depth=1, projector_dim=16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(0.05 * torch.randn_like(p))
    sd = model.state_dict()
    plain = tmp_path / "last.pt"
    torch.save(sd, plain)
    args = argparse.Namespace(model="SiT-XL/2", resolution=512, enc_type="dinov2-vit-b", proj_coeff=0.5,
                              encoder_depth=1, num_classes=1000)
    training = tmp_path / "0400000.pt"
    torch.save({"model": sd, "ema": sd, "opt": {}, "args": args, "steps": 400000}, training)
    return model, plain, training


def test_repa_512_checkpoint_loads_and_samples(tmp_path):
    ref, plain, training = _repa_512_layout(tmp_path)
    model, info = load_model(plain, num_heads=2, encoder_depth=1)
    assert (info.config["input_size"], model.num_tokens, info.time_convention) == (64, 1024, "repa")
    model, info = load_model(training, num_heads=2)
    assert info.ema and info.step == 400000 and info.config["encoder_depth"] == 1
    noise = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([3, 999])
    with torch.no_grad():
        x, zs = model(noise, torch.full((2,), 0.5), labels)
        x_ref, zs_ref = ref.eval()(noise, torch.full((2,), 0.5), labels)
    torch.testing.assert_close(x, x_ref)
    assert zs[0].shape == (2, 1024, 24)
    # REPA's sampler settings: SDE, CFG 1.8 on t <= 0.7 (a few steps here)
    out = sample(model, noise, labels, method="sde", steps=4, cfg_scale=1.8, guidance_interval=(0.0, 0.7),
                 generator=torch.Generator().manual_seed(2))
    assert out.shape == (2, 4, 64, 64) and torch.isfinite(out).all()


def test_training_and_alignment_at_1024_tokens_with_encoder_tokens_resized(tmp_path, caplog):
    """1024 model tokens (64 px pixels, patch 2: 32x32) against a 16x16 encoder grid: the REPA loss (encoder
    tokens resized to the model grid), the alignment (CKNNA per block) and a spatial metric at 1024 tokens."""
    from repa_probe.analysis.alignment.run import alignment_table
    from repa_probe.analysis.alignment.spatial import model_spatial_values
    from repa_probe.analysis.core.features import prepare_inputs
    from repa_probe.analysis.core.inputs import (DataSource, build_analysis_dataset, build_config_encoder,
                                                 load_checkpoints)
    from repa_probe.analysis.core.options import AlignmentOptions
    from repa_probe.training.trainer import train

    cfg = load_config(None, [f"run.out_dir={tmp_path}", "run.name=r512", "train.steps=1", "train.ckpt_every=1",
                             "train.log_every=1", "train.tensorboard=false", "data.resolution=64", "data.num_samples=16",
                             "train.batch_size=4", "model.patch_size=2", "model.depth=2", "model.hidden_size=32",
                             "repa.encoder_depth=1", "repa.projector_dim=16"])
    with caplog.at_level("INFO", logger="repa_probe"):
        run = train(cfg)
    assert "encoder token grid 16x16 is resized to the model grid 32x32" in caplog.text
    options = AlignmentOptions(timesteps=[0, 1], topk=3, batch_size=16, progress=False)
    entry = load_checkpoints([run / "checkpoints" / "0000001.pt"], options)[0]
    assert entry.model.num_tokens == 1024
    dataset, _ = build_analysis_dataset(DataSource("shapes", None, 64, 0, 4, "none", None, True), "val", 12)
    rows = alignment_table(entry.model, entry.objective, dataset, build_config_encoder(entry.cfg), options)
    assert {(r["layer"], r["timestep"]) for r in rows} == {(1, 0.0), (2, 0.0), (1, 1.0), (2, 1.0)}
    assert all(-1 <= r["value"] <= 1 for r in rows)
    inputs = prepare_inputs(torch.utils.data.Subset(dataset, range(3)), progress=False)
    values = model_spatial_values(entry.model, entry.objective, inputs, [0.5], [1], ["lds"], progress=False)
    assert values[(1, 0.5)]["lds"].shape == (3,) and torch.isfinite(values[(1, 0.5)]["lds"]).all()
