"""Golden part "lightningdit": hustvl/LightningDiT's model, training loss and ODE sampler on small random models.

Files (their ``models/lightningdit.LightningDiT``, ``transport.create_transport`` / ``Sampler``, CPU, float32):

* ``lightningdit_state_dict.pt`` / ``lightningdit_io.pt``: their released switch set (SwiGLU, RMSNorm, RoPE;
  qk-norm and wo_shift off), patch 1, 8 latent channels; ``lightningdit_all_*``: every switch on (qk-norm as
  RMSNorm, wo_shift), patch 2, learn_sigma. State dicts are plain ``state_dict()`` (their released format);
  ``*_io.pt`` holds ``config`` (their constructor keywords), ``x``, ``t`` (SiT time, t = 0 noise), ``y`` (one
  null label), ``out`` and ``hidden`` (every block's output).
* ``lightningdit_loss.pt``: ``training_losses`` of ``create_transport("Linear", "velocity", use_cosine_loss=True,
  use_lognorm=True)`` on the first model: ``x1`` (data), ``noise`` (their x0), ``t`` (SiT time, logit-normal
  draw), ``x_t``, ``model_out``, ``loss`` (MSE) and ``cos_loss`` per sample. Their draws are read back: t as the
  model received it, the noise by replaying the global torch RNG (checked against the x_t they built).
* ``sampling_lightningdit.pt``: ``Sampler.sample_ode(sampling_method="euler", timestep_shift=...)`` with
  ``forward`` or ``forward_with_cfg`` (``cfg_interval=True``; it guides channels 0-2 only) on a released-switch
  model with 8 channels; per case ``num_steps`` (their grid points: num_steps - 1 Euler steps), ``shift``,
  ``cfg_scale``, ``interval_start`` (SiT time) and ``out``.

Their code imports ``einops``, ``timm``, ``torchdiffeq`` (ODE sampler) and, in ``models/rmsnorm.py``, ``fairscale``
(its model-parallel layers are unused here: stubbed when missing); ``torch.compile`` decorators are made no-ops
while their modules are imported. Nothing in the checkout is modified.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
from pathlib import Path

import torch

from tools.golden.common import log, need, randomize_, repo_on_path, save_pt, seed_all, stub_modules
from tools.golden.models import run_with_hidden

NUM_CLASSES = 10
BATCH = 4
FAIRSCALE = ("fairscale", "fairscale.nn", "fairscale.nn.model_parallel", "fairscale.nn.model_parallel.initialize",
             "fairscale.nn.model_parallel.layers")
#: name -> (their LightningDiT keywords, seed)
CONFIGS: dict[str, tuple[dict, int]] = {
    "lightningdit": (dict(input_size=8, patch_size=1, in_channels=8, hidden_size=64, depth=2, num_heads=4,
                          mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=NUM_CLASSES, learn_sigma=False,
                          use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False), 20),
    "lightningdit_all": (dict(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=3, num_heads=3,
                              mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=NUM_CLASSES, learn_sigma=True,
                              use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=True), 21),
}
SAMPLING = dict(input_size=8, patch_size=1, in_channels=8, hidden_size=32, depth=2, num_heads=2, mlp_ratio=4.0,
                class_dropout_prob=0.1, num_classes=NUM_CLASSES, use_swiglu=True, use_rope=True, use_rmsnorm=True)
SAMPLING_CASES = {  # their config: 250 points, shift 0.3, CFG 6.7 from t_sit = 0.125 (10.0 from 0.11 at 64 epochs)
    "euler": dict(num_steps=6, shift=0.0, cfg_scale=1.0, interval_start=0.0),
    "euler_shift": dict(num_steps=9, shift=0.3, cfg_scale=1.0, interval_start=0.0),
    "euler_shift_cfg_interval": dict(num_steps=12, shift=0.3, cfg_scale=6.7, interval_start=0.125),
    "euler_cfg_interval_64ep": dict(num_steps=10, shift=0.3, cfg_scale=10.0, interval_start=0.11),
}


@contextlib.contextmanager
def official(repo: Path):
    """Their ``models.lightningdit`` and ``transport`` modules, imported with ``torch.compile`` as a no-op."""
    compile_ = torch.compile
    torch.compile = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
    try:
        with repo_on_path(repo), stub_modules(*FAIRSCALE, **{
                f"fairscale.nn.model_parallel.layers.{n}": None
                for n in ("ColumnParallelLinear", "ParallelEmbedding", "RowParallelLinear")}):
            models = importlib.import_module("models.lightningdit")
            transport = importlib.import_module("transport")
            torch.compile = compile_
            yield models, transport
    finally:
        torch.compile = compile_


def build(models, config: dict, seed: int) -> torch.nn.Module:
    """Their model with seeded random weights (norm weights 1 + noise), in eval mode."""
    gen = seed_all(seed)
    model = models.LightningDiT(**config)
    randomize_(model, gen)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm_final.weight", "q_norm.weight", "k_norm.weight")):
                p.add_(1.0)
    return model.eval()


def forward_record(model, config: dict, seed: int) -> dict:
    """Fixed inputs (t in SiT time, 0 and 1 included; one null label), their output and every block's output."""
    gen = torch.Generator().manual_seed(1000 + seed)
    s, c = config["input_size"], config["in_channels"]
    x = torch.randn(BATCH, c, s, s, generator=gen)
    t = torch.cat([torch.tensor([0.0]), torch.rand(BATCH - 2, generator=gen), torch.tensor([1.0])])
    y = torch.tensor([0, 3, NUM_CLASSES, NUM_CLASSES - 1], dtype=torch.int64)
    out, hidden = run_with_hidden(model, x, t, y)
    return {"config": dict(config), "x": x, "t": t, "y": y, "out": out, "hidden": hidden}


def loss_record(model, transport_pkg, seed: int = 30) -> dict:
    """Their training loss with its own draws of t (logit-normal, numpy) and noise (torch), read back."""
    import numpy as np

    gen = torch.Generator().manual_seed(1000 + seed)  # not `seed`: that is the global RNG's their noise comes from
    x1 = torch.randn(BATCH, model.in_channels, 8, 8, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)
    seen = {}

    def recording(xt, t, **kw):
        seen.update(x_t=xt.detach().clone(), t=t.detach().clone())
        return model(xt, t, **kw)

    transport = transport_pkg.create_transport("Linear", "velocity", None, None, None, use_cosine_loss=True,
                                               use_lognorm=True)
    np.random.seed(seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        terms = transport.training_losses(recording, x1, dict(y=y))
    torch.manual_seed(seed)
    noise = torch.randn_like(x1)  # their x0 = randn_like(x1), the first torch draw
    t4 = seen["t"].view(-1, 1, 1, 1)
    if torch.equal(noise, x1) or not torch.allclose(t4 * x1 + (1 - t4) * noise, seen["x_t"], atol=1e-6):
        raise RuntimeError("the replayed noise does not rebuild their x_t")
    return dict(x1=x1, y=y, noise=noise, t=seen["t"], x_t=seen["x_t"], model_out=terms["pred"],
                loss=terms["loss"], cos_loss=terms["cos_loss"])


def sampling_record(models, transport_pkg) -> dict:
    model = build(models, SAMPLING, 40)
    gen = torch.Generator().manual_seed(41)
    b, c, s = 3, SAMPLING["in_channels"], SAMPLING["input_size"]
    noise = torch.randn(b, c, s, s, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (b,), generator=gen)
    sampler = transport_pkg.Sampler(transport_pkg.create_transport("Linear", "velocity", None, None, None,
                                                                   use_cosine_loss=True, use_lognorm=True))
    cases = {}
    for name, case in SAMPLING_CASES.items():
        fn = sampler.sample_ode(sampling_method="euler", num_steps=case["num_steps"], atol=1e-6, rtol=1e-3,
                                reverse=False, timestep_shift=case["shift"])
        with torch.no_grad():
            if case["cfg_scale"] > 1.0:
                z = torch.cat([noise, noise])
                y = torch.cat([labels, torch.full_like(labels, NUM_CLASSES)])
                out = fn(z, model.forward_with_cfg, y=y, cfg_scale=case["cfg_scale"], cfg_interval=True,
                         cfg_interval_start=case["interval_start"])[-1][:b]
            else:
                out = fn(noise.clone(), model.forward, y=labels)[-1]
        cases[name] = dict(case, out=out.clone())
    return dict(family="LightningDiT", config=dict(SAMPLING), state_dict=dict(model.state_dict()), noise=noise,
                labels=labels, cases=cases)


def write(out_dir: Path, repos: dict[str, Path], commits: dict[str, str] | None = None) -> list[Path]:
    """Write the model, loss and sampler records; skipped (with a notice) without the checkout or its imports."""
    if not need(repos, "lightningdit", part="lightningdit"):
        return []
    missing = [m for m in ("einops", "torchdiffeq") if importlib.util.find_spec(m) is None]
    if missing:
        log.warning("golden part 'lightningdit' skipped: their code needs %s (pip install --target DIR ...; put DIR "
                    "on PYTHONPATH, see tools/README.md)", ", ".join(missing))
        return []
    out_dir = Path(out_dir)
    written = []
    with official(Path(repos["lightningdit"])) as (models, transport_pkg):
        for name, (config, seed) in CONFIGS.items():
            model = build(models, config, seed)
            written.append(save_pt(model.state_dict(), out_dir / f"{name}_state_dict.pt"))
            written.append(save_pt(forward_record(model, config, seed), out_dir / f"{name}_io.pt"))
            if name == "lightningdit":
                written.append(save_pt(loss_record(model, transport_pkg), out_dir / "lightningdit_loss.pt"))
        written.append(save_pt(sampling_record(models, transport_pkg), out_dir / "sampling_lightningdit.pt"))
    return written
