"""Golden part "models": small random DiT, SiT and REPA models built with their authors' code.

For each model it writes ``{name}_state_dict.pt`` (a plain ``model.state_dict()``, the format of the released
DiT-XL-2-256x256.pt / SiT-XL-2-256.pt / REPA last.pt) and ``{name}_io.pt``: the constructor keywords
(``config``), fixed inputs ``x: (B, C, H, W)``, ``t: (B,)``, ``y: (B,)`` (one label is the null class), the
forward output ``out`` in eval mode, ``hidden: (depth, B, T, D)`` (every block's output, read with forward
hooks) and, for REPA, ``zs``: the projector outputs, one ``(B, T, z_dim)`` per projector.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tools.golden.common import import_file, log, need, randomize_, save_pt, seed_all

BATCH = 4
NUM_CLASSES = 10
#: name -> (repo key, constructor keywords of their class, seed). Kept small (< 1.1 MB per state dict).
CONFIGS: dict[str, tuple[str, dict, int]] = {
    # DiT (learned sigma: 8 output channels, integer DDPM steps)
    "dit": ("dit", dict(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4,
                        mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=NUM_CLASSES, learn_sigma=True), 0),
    # official SiT (t = 0 noise; learned-sigma head whose second half forward() discards); patch 4
    "sit": ("sit", dict(input_size=16, patch_size=4, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                        mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=NUM_CLASSES, learn_sigma=True), 1),
    # REPA's SiT: two projectors aligned at block 4 of 6 (no shape reveals the 4)
    "repa": ("repa", dict(path_type="linear", input_size=8, patch_size=2, in_channels=4, hidden_size=48,
                          decoder_hidden_size=48, encoder_depth=4, depth=6, num_heads=4, mlp_ratio=4.0,
                          class_dropout_prob=0.1, num_classes=NUM_CLASSES, z_dims=[32, 24], projector_dim=40,
                          qk_norm=False, fused_attn=True), 2),
    # REPA's SiT with qk_norm (timm q_norm / k_norm LayerNorms), aligned at block 1
    "repa_qknorm": ("repa", dict(path_type="linear", input_size=8, patch_size=2, in_channels=4, hidden_size=48,
                                 decoder_hidden_size=48, encoder_depth=1, depth=2, num_heads=3, mlp_ratio=4.0,
                                 class_dropout_prob=0.1, num_classes=NUM_CLASSES, z_dims=[16], projector_dim=32,
                                 qk_norm=True, fused_attn=False), 3),
}


def official_class(repo_key: str, repo: Path):
    """The official model class: DiT ``models.DiT``, SiT ``models.SiT``, REPA ``models/sit.SiT``."""
    if repo_key == "dit":
        return import_file("golden_dit_models", repo / "models.py").DiT
    if repo_key == "sit":
        return import_file("golden_sit_models", repo / "models.py").SiT
    return import_file("golden_repa_models_sit", repo / "models" / "sit.py").SiT


def build(name: str, repos: dict[str, Path]) -> torch.nn.Module:
    """Golden model ``name`` (see CONFIGS), with seeded random weights everywhere but ``pos_embed``, in eval mode."""
    repo_key, config, seed = CONFIGS[name]
    gen = seed_all(seed)
    model = official_class(repo_key, Path(repos[repo_key]))(**config)
    randomize_(model, gen)
    return model.eval()


def inputs(name: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Fixed inputs for ``name``: x (B, C, H, W), t (B,) (int64 steps for DiT, else float in [0, 1]), y (B,)."""
    repo_key, config, seed = CONFIGS[name]
    gen = torch.Generator().manual_seed(1000 + seed)
    s, c = config["input_size"], config["in_channels"]
    x = torch.randn(BATCH, c, s, s, generator=gen)
    if repo_key == "dit":
        t = torch.tensor([0, 1, 500, 999], dtype=torch.int64)
    else:
        t = torch.cat([torch.tensor([0.0]), torch.rand(BATCH - 2, generator=gen), torch.tensor([1.0])])
    y = torch.tensor([0, 3, NUM_CLASSES, NUM_CLASSES - 1], dtype=torch.int64)  # NUM_CLASSES = null class
    return {"x": x, "t": t, "y": y}


@torch.no_grad()
def run_with_hidden(model: torch.nn.Module, x, t, y):
    """Their forward pass plus every block's output: ``(output, hidden (depth, B, T, D))``."""
    hidden = []
    hooks = [blk.register_forward_hook(lambda m, i, o: hidden.append(o.detach().clone())) for blk in model.blocks]
    try:
        out = model(x, t, y)
    finally:
        for h in hooks:
            h.remove()
    return out, torch.stack(hidden)


def write(out_dir: Path, repos: dict[str, Path], commits: dict[str, str] | None = None) -> list[Path]:
    """Write the state dict and the forward-pass record of every model whose repo was given."""
    written = []
    for name, (repo_key, config, _) in CONFIGS.items():
        if not need(repos, repo_key, part=f"models:{name}"):
            continue
        try:
            model = build(name, repos)
        except AssertionError as exc:  # timm >= 1.0.16 has no default norm_layer for qk_norm
            log.warning("golden model %r skipped: their code fails with this timm (%s); REPA was written for an "
                        "older timm whose Attention(qk_norm=True) defaults to LayerNorm (1.0.12 does): put one first "
                        "on PYTHONPATH (tools/README.md)", name, exc)
            continue
        io = inputs(name, model)
        out, hidden = run_with_hidden(model, io["x"], io["t"], io["y"])
        record = {"config": dict(config), **io, "hidden": hidden}
        if isinstance(out, tuple):  # REPA: (output, zs)
            out, zs = out
            record["zs"] = [z.detach().clone() for z in zs]
        record["out"] = out
        written.append(save_pt(model.state_dict(), Path(out_dir) / f"{name}_state_dict.pt"))
        written.append(save_pt(record, Path(out_dir) / f"{name}_io.pt"))
    return written
