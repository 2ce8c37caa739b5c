"""REG and HASTE in training: tiny CPU runs of both recipes, their encoder inputs, HASTE's switch-off, config errors.
(Their official outputs, losses and sampler: tests/test_golden_family.py.)"""
from pathlib import Path

import pytest
import torch

from repa_probe.checkpoint import load_model
from repa_probe.objectives import AttentionTap
from repa_probe.training import rundir
from repa_probe.training.builders import Batches, build_encoder, model_inputs
from repa_probe.training.config import ConfigError, load_config
from repa_probe.training.distributed import DistInfo
from repa_probe.training.trainer import TrainState, train, train_step

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.log_every=1", "data.num_samples=32", "train.batch_size=8", "train.tensorboard=false",
        "model.depth=3", "model.hidden_size=32", "model.num_heads=2", "repa.projector_dim=32"]
REG = ["reg.cls_coeff=0.03"]
HASTE = ["haste.attn_coeff=0.5", "haste.stop_step=2", "haste.student_blocks=[1,2]", "haste.teacher_layers=[1,2]"]
CPU = torch.device("cpu")


def cfg_for(tmp_path, *extra):
    return load_config(None, [f"run.out_dir={tmp_path}", "run.name=r", *FAST, *extra])


@pytest.mark.parametrize("name", ["reg_sit", "haste_sit"])
def test_paper_configs_load(name):
    cfg = load_config(str(ROOT / f"configs/{name}.yaml"))
    assert cfg.model.name == "SiT-XL/2" and cfg.repa.proj_coeff == 0.5 and cfg.repa.encoder_depth == 8
    assert cfg.encoder.name == "dinov2_vitb14" and cfg.train.batch_size == 256 and cfg.optim.lr == 1e-4
    if name == "reg_sit":
        assert cfg.reg.cls_coeff == 0.03 and cfg.haste.attn_coeff == 0
    else:
        assert (cfg.haste.attn_coeff, cfg.haste.stop_step, cfg.reg.cls_coeff) == (0.5, 250000, 0.0)
        assert cfg.haste.student_blocks == [5, 6, 7, 8] and cfg.haste.teacher_layers == [9, 10, 11, 12]


def test_reg_trains_and_loads_as_a_reg_model(tmp_path):
    run = train(cfg_for(tmp_path, *REG, "train.steps=3"))
    rows = rundir.read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["cls"] > 0 and "repa" in r for r in rows)
    model, info = load_model(run / "checkpoints" / "0000003.pt")
    assert info.config["cls_token_dim"] == 64 and model.num_prefix_tokens == 1  # tiny_vit's width
    assert model.pos_embed.shape == (1, 1 + model.num_tokens, 32) and not model.pos_embed[0, 0].any()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    out, zs, cls_out = model(x, torch.rand(2), y, cls_token=torch.randn(2, 64))
    assert out.shape == x.shape and zs[0].shape == (2, 1 + model.num_tokens, 64) and cls_out.shape == (2, 64)


def test_reg_targets_put_the_encoder_class_token_first(tmp_path):
    cfg = cfg_for(tmp_path, *REG)
    dist = DistInfo()
    batches, enc = Batches(cfg, dist), build_encoder(cfg, CPU)
    batch = batches.next()
    _, z, _ = model_inputs(batch, None, enc, CPU, torch.Generator().manual_seed(0), dist, cfg, grid=8)
    assert z.shape == (8, 65, 64)
    torch.testing.assert_close(z[:, 0], enc.cls(batch["image"]))
    torch.testing.assert_close(z[:, 1:], enc(batch["image"]))
    reg_only = cfg_for(tmp_path, *REG, "repa.proj_coeff=0")  # REG without REPA: no projectors, still the token
    s = TrainState.build(reg_only, dist, CPU)
    assert s.enc is not None and not len(s.model.projectors) and s.model.cls_token_dim == 64
    logs = train_step(s)
    assert "repa" not in logs and logs["cls"] > 0


def test_haste_aligns_attention_then_switches_off_without_the_encoder(tmp_path):
    s = TrainState.build(cfg_for(tmp_path, *HASTE), DistInfo(), CPU)
    calls = []
    s.enc.register_forward_hook(lambda m, i, o: calls.append(1))
    logs = [train_step(s) for _ in range(4)]
    assert len(calls) == 2  # steps 1 and 2 (0 and 1 completed before them) align; then the encoder rests
    assert all(log["attn"] > 0 and log["repa"] != 0 for log in logs[:2])
    assert all(log["attn"] == 0 and log["repa"] == 0 for log in logs[2:])
    assert all(torch.isfinite(log["total"]) for log in logs)


def test_attention_tap_reads_the_attention_the_encoder_applies():
    """The tap's logits, softmaxed and applied to the values, reproduce timm's attention output (patch tokens
    dropped from nothing here: prefix 0), so they are the attention the encoder computes."""
    cfg = load_config(None, [])
    enc = build_encoder(cfg, CPU, required=True)
    attn = enc.backbone.blocks[1].attn
    seen = {}
    attn.register_forward_hook(lambda m, i, o: seen.update(x=i[0], out=o))
    tap = AttentionTap([attn])
    enc(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    logits = tap.logits()[0]
    b, n, d = seen["x"].shape
    v = attn.qkv(seen["x"]).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)[2]
    mixed = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    torch.testing.assert_close(attn.proj(mixed), seen["out"], rtol=1e-5, atol=1e-5)
    prefixed = AttentionTap([attn], prefix=enc.backbone.num_prefix_tokens)
    enc(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert prefixed.logits(heads=1)[0].shape == (2, 1, enc.num_tokens, enc.num_tokens)
    tap.remove()
    prefixed.remove()


@pytest.mark.parametrize("extra,match", [
    (["reg.cls_coeff=0.03", "repa.projector=conv"], "REG"),
    (["haste.attn_coeff=0.5", "haste.student_blocks=[1]", "haste.teacher_layers=[1,2]"], "equally long"),
    (["haste.stop_step=-1"], "stop_step"),
])
def test_bad_family_configs_are_one_line_errors(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        cfg_for(tmp_path, *extra)


@pytest.mark.parametrize("extra,match", [
    (["haste.student_blocks=[4,5]", "haste.teacher_layers=[1,2]"], "beyond"),
    (["haste.student_blocks=[1,2]", "haste.teacher_layers=[1,2]", "encoder.input_size=16"], "grid"),
    (["haste.student_blocks=[1,2]", "haste.teacher_layers=[1,2]", "model.num_heads=1"], "heads"),
])
def test_haste_blocks_grids_and_heads_are_checked_against_the_networks(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        TrainState.build(cfg_for(tmp_path, "haste.attn_coeff=0.5", *extra), DistInfo(), CPU)


def test_family_study_config_trains_the_six_methods(tmp_path):
    from repa_probe.sweeps.study import load_study_config, train_config

    cfg = load_study_config(str(ROOT / "configs/study_family.yaml"), [f"study.out_dir={tmp_path}"])
    runs = {name: train_config(cfg, name) for name in cfg.train.runs}
    assert list(runs) == ["none", "repa", "irepa", "reg", "haste", "repae"]
    assert runs["none"].repa.proj_coeff == 0 and runs["irepa"].repa.projector == "conv"
    assert runs["reg"].reg.cls_coeff > 0 and runs["reg"].repa.proj_coeff > 0
    assert runs["haste"].haste.attn_coeff > 0 and 0 < runs["haste"].haste.stop_step < runs["haste"].train.steps
    repae = runs["repae"]
    assert repae.vae.tune and repae.repa.vae_coeff > 0 and repae.repa.proj_coeff > 0
    assert repae.vae.name.startswith("random:") and repae.vae_loss.perceptual_weight == 0
    assert {"alignment", "probe", "fid"} <= set(cfg.analyses)
    s = TrainState.build(repae, DistInfo(), CPU)  # the REPA-E run as the study trains it: one end-to-end step
    vae_before = {k: v.clone() for k, v in s.e2e.vae.state_dict().items()}
    logs = train_step(s)
    assert s.step == 1 and torch.isfinite(torch.stack([v for v in logs.values() if torch.is_tensor(v)])).all()
    assert any(not torch.equal(vae_before[k], v) for k, v in s.e2e.vae.state_dict().items())
