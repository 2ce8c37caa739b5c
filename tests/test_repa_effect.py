"""The scientific claim in miniature: REPA raises the alignment of the aligned block to the target encoder.

Two tiny SiTs are trained identically for the same steps, one with REPA (block 2 aligned to a fixed,
random-initialised tiny ViT) and one without. CKNNA (k=10) between each model's mean-pooled block-2 hidden
states and the encoder's mean patch tokens, on held-out shapes, must be clearly higher for the REPA model.
"""
import torch

from repa_probe.analysis.alignment.run import AlignmentOptions, alignment_table
from repa_probe.training.builders import build_encoder, build_objective
from repa_probe.checkpoint import load_model
from repa_probe.training.config import load_config
from repa_probe.data import ShapesDataset
from repa_probe.training.trainer import train

STEPS = 150
COMMON = [f"train.steps={STEPS}", f"train.ckpt_every={STEPS}", "train.log_every=1000", "train.tensorboard=false",
          "model.depth=3", "model.hidden_size=64", "model.num_heads=2", "repa.projector_dim=64",
          "repa.encoder_depth=2", "train.batch_size=16", "data.num_samples=512"]


def test_repa_aligns_the_aligned_block_better_than_vanilla(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = ShapesDataset(256, resolution=32, seed=0, split="val")
        scores = {}
        for name, coeff in (("repa", 0.5), ("vanilla", 0.0)):
            cfg = load_config(None, [f"run.out_dir={tmp_path}", f"run.name={name}", f"repa.proj_coeff={coeff}",
                                     *COMMON])
            run = train(cfg)
            # 150 steps at ema_decay 0.99 (the tiny config): the EMA still holds 0.99**150 = 22% of the
            # init, so read the online weights
            model, _ = load_model(run / f"checkpoints/{STEPS:07d}.pt", prefer_ema=False)
            encoder = build_encoder(cfg, torch.device("cpu"), required=True)  # the very target REPA trained on
            options = AlignmentOptions(layers=[2], timesteps=[0.0, 0.5], target_kind="mean_patch", progress=False)
            rows = alignment_table(model, build_objective(cfg), data, encoder, options)
            scores[name] = {r["timestep"]: r["value"] for r in rows}
    finally:
        torch.set_num_threads(threads)
    for t in (0.0, 0.5):
        assert scores["repa"][t] > scores["vanilla"][t] + 0.03, scores


def test_config_encoder_is_reproducible():
    cfg = load_config(None, [])
    a = build_encoder(cfg, torch.device("cpu"))
    torch.rand(10)  # global RNG state must not matter
    b = build_encoder(cfg, torch.device("cpu"))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = build_encoder(load_config(None, ["run.seed=1"]), torch.device("cpu"))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
