"""Typed training configuration: YAML files read into dataclasses, with `key.sub=value` overrides.

The dataclass defaults ARE the embedded default run (``tiny``): a small SiT + REPA trained in pixel space on
the built-in ``shapes`` dataset against an explicitly random-initialised tiny ViT, which finishes on one CPU
in under a minute. The paper recipes live in ``configs/*.yaml`` and override what they need.

Three keys are a stable interface that scripts depend on: ``run.out_dir``, ``train.steps``,
``repa.proj_coeff``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import yaml
from omegaconf import OmegaConf

from repa_probe.models.registry import model_kwargs
from repa_probe.yaml_config import ConfigError, check_keys, load_structured  # noqa: F401 (re-exported)
from repa_probe.models.transformer import ModelInputError, encoder_depth_problem


@dataclass
class RunConfig:
    name: str = "tiny"  # run directory name under out_dir
    out_dir: str = "runs"  # parent directory of all runs
    seed: int = 0  # global seed (data order, noise, init)


@dataclass
class ModelConfig:
    name: str = "SiT-S/4"  # registry name: SiT-{S,B,L,XL}/{1,2,4,8}, DiT-{S,B,L,XL}/{2,4,8}, LightningDiT-*/{1,2,4,8}
    depth: Optional[int] = 4  # overrides of the named size (null = keep the size's value)
    hidden_size: Optional[int] = 128
    num_heads: Optional[int] = 2
    patch_size: Optional[int] = None
    qk_norm: bool = False  # REPA's --qk-norm (LightningDiT with rmsnorm: RMSNorm over head_dim)
    swiglu: Optional[bool] = None  # LightningDiT-* only: SwiGLU MLP (null = the name's default: on)
    rmsnorm: Optional[bool] = None  # LightningDiT-* only: RMSNorm instead of LayerNorm (null = on)
    rope: Optional[bool] = None  # LightningDiT-* only: 2-D axial RoPE on q, k (null = on)
    wo_shift: Optional[bool] = None  # LightningDiT-* only: adaLN without shift (null = off)
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance (0 = no null class)


@dataclass
class ObjectiveConfig:
    kind: str = "flow"  # flow (SiT / REPA interpolant) or ddpm (DiT)
    path: str = "linear"  # flow: linear or cosine
    prediction: str = "v"  # flow: velocity prediction
    weighting: str = "uniform"  # flow: uniform or lognormal time sampling (linear path: logit-normal t)
    cosine_weight: float = 0.0  # flow: weight of LightningDiT's velocity-direction term 1 - cos(v_pred, v) (theirs: 1)
    num_timesteps: int = 1000  # ddpm: number of diffusion steps
    learn_sigma: bool = True  # ddpm: learned-range variance (hybrid loss)


@dataclass
class RepaConfig:
    proj_coeff: float = 0.5  # weight of the REPA loss; 0 = vanilla baseline (no encoder, no projector)
    encoder_depth: int = 2  # 1-based block whose output is aligned (paper: 8 for L/XL, 4 for B)
    projector_dim: int = 256  # hidden width of the projector MLP (paper: 2048)
    projector: str = "mlp"  # mlp (REPA) or conv (iREPA: a k x k convolution on the token grid)
    projector_kernel: int = 3  # conv projector kernel k (iREPA paper: 3; its SiT trainer's default is 1)
    spatial_norm_gamma: Optional[float] = None  # iREPA target normalisation (x - g*mean_T)/(std_T + 1e-6); null = off
    vae_coeff: float = 1.5  # REPA-E (vae.tune=true): weight of the REPA loss back-propagated into the VAE


@dataclass
class RegConfig:
    cls_coeff: float = 0.0  # REG: class-token loss weight (paper 0.03); > 0 denoises the encoder CLS as a token


@dataclass
class HasteConfig:
    attn_coeff: float = 0.0  # HASTE: weight of the attention-map alignment loss (paper 0.5); 0 = off
    stop_step: Optional[int] = None  # HASTE: no alignment (REPA, attention) nor encoder from this step; null = never
    student_blocks: List[int] = field(default_factory=lambda: [5, 6, 7, 8])  # 1-based model blocks (HASTE: 5-8)
    teacher_layers: List[int] = field(default_factory=lambda: [9, 10, 11, 12])  # 1-based encoder layers (DINOv2-B 9-12)


@dataclass
class EncoderConfig:
    name: str = "tiny_vit"  # dinov2_vitb14, clip_vitl14, mae_vitl16, ijepa_vith14, siglip_vitb16... or tiny_vit
    weights: Optional[str] = None  # local weight file (.pth / .safetensors)
    pretrained: bool = False  # false = random init (explicit); true = load weights (file, hub or timm cache)
    source: str = "auto"  # auto, hub or timm
    input_size: Optional[int] = None  # encoder input pixels (null = 224 * resolution / 256 for patch 14)


@dataclass
class VAEConfig:
    name: str = "none"  # none (pixel space), stabilityai/sd-vae-ft-mse, -ema, a diffusers dir, an LDM .pt, random:tiny
    latent_norm: str = "fixed"  # fixed (the VAE's scale / statistics) or batchnorm (REPA-E: BatchNorm in the model)
    bn_momentum: float = 0.1  # latent_norm=batchnorm: momentum of its running statistics (REPA-E: 0.1)
    tune: bool = False  # REPA-E: train the VAE end to end (needs latent_norm=batchnorm; see vae_loss.*)
    lr: float = 1e-4  # tune: AdamW learning rate of the VAE (betas, eps, weight decay: optim.*)


@dataclass
class VAELossConfig:
    recon_weight: float = 1.0  # L1 reconstruction
    perceptual_weight: float = 1.0  # LPIPS (0 = off; needs lpips_weights)
    lpips_weights: Optional[str] = None  # LPIPS lin layers (vgg.pth of taming-transformers / lpips), or a full LPIPS
    vgg_weights: Optional[str] = None  # torchvision vgg16-397923af.pth (null = torch hub cache)
    kl_weight: float = 1e-6  # KL to N(0, 1), summed over latent elements / batch
    disc_weight: float = 0.1  # adversarial term of the VAE loss (PatchGAN, hinge)
    disc_start: int = 0  # first step with the adversarial terms
    disc_lr: float = 1e-4  # AdamW learning rate of the discriminator
    disc_channels: int = 64  # PatchGAN width ndf (REPA-E: 64)


@dataclass
class DataConfig:
    name: str = "shapes"  # shapes, digits, imagefolder, repa (REPA's images/ + vae-sd/ layout)
    root: Optional[str] = None  # dataset directory (imagefolder, repa)
    resolution: int = 32  # image side in pixels
    num_samples: Optional[int] = 2000  # size of procedural datasets
    num_classes: Optional[int] = None  # null = the dataset's own
    flip: bool = False  # random horizontal flip (REPA: none, DiT: yes)
    num_workers: int = 0  # DataLoader worker processes


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm (0 = off)


@dataclass
class TrainConfig:
    steps: int = 200  # total optimiser steps
    batch_size: int = 32  # GLOBAL batch size (divided over processes)
    grad_accum: int = 1  # micro-batches per step (gradients summed): the same batch with 1/k of the activation memory
    ema_decay: float = 0.99  # EMA of the weights (paper: 0.9999; the tiny run is too short for that)
    precision: str = "bf16"  # bf16, fp16 or fp32 autocast on GPU; the CPU always runs fp32
    tf32: bool = True  # allow TF32 matmuls on GPU
    compile: str = "auto"  # torch.compile model + encoder: auto (on CUDA; eager on CPU), true or false
    device: str = "auto"  # auto, cpu or cuda
    log_every: int = 50  # log line every N steps
    ckpt_every: int = 100  # checkpoint every N steps (and at the end)
    keep_last: int = 2  # keep the last K checkpoints ...
    keep_every: int = 0  # ... plus every checkpoint whose step is a multiple of M (0 = none)
    resume: str = "auto"  # auto (latest in the run dir), none, or a checkpoint path
    tensorboard: bool = True  # also write TensorBoard event files


@dataclass
class SlurmConfig:
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 8
    mem_gb: Optional[int] = None
    timeout_min: int = 4320
    max_requeue: int = 10  # requeues after preemption / time-out before giving up


@dataclass
class LaunchConfig:
    mode: str = "local"  # local (one process, or torchrun sets the processes), slurm, submitit_local
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    reg: RegConfig = field(default_factory=RegConfig)
    haste: HasteConfig = field(default_factory=HasteConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    vae_loss: VAELossConfig = field(default_factory=VAELossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


CHOICES = {
    "objective.kind": ("flow", "ddpm"),
    "objective.path": ("linear", "cosine"),
    "objective.prediction": ("v",),
    "objective.weighting": ("uniform", "lognormal"),
    "train.precision": ("bf16", "fp16", "fp32"),
    "train.device": ("auto", "cpu", "cuda"),
    "launch.mode": ("local", "slurm", "submitit_local"),
    "encoder.source": ("auto", "hub", "timm"),
    "train.compile": ("auto", "true", "false"),
    "repa.projector": ("mlp", "conv"),
    "vae.latent_norm": ("fixed", "batchnorm"),
}


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or the embedded default when ``path`` is None) and apply dotlist overrides.

    Unknown keys, wrong value types, a missing file and invalid choices raise ConfigError (one line).
    """
    cfg: Config = load_structured(Config, path, overrides)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check value ranges and choices that the types cannot express."""
    cfg.train.compile = str(cfg.train.compile).lower()  # YAML true/false arrive as "True"/"False"
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(allowed)}")
    positive = {"train.steps": cfg.train.steps, "train.batch_size": cfg.train.batch_size,
                "train.grad_accum": cfg.train.grad_accum,
                "train.log_every": cfg.train.log_every, "train.ckpt_every": cfg.train.ckpt_every,
                "data.resolution": cfg.data.resolution}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if cfg.objective.cosine_weight < 0:
        raise ConfigError(f"objective.cosine_weight must be >= 0, got {cfg.objective.cosine_weight}")
    if cfg.repa.proj_coeff < 0:
        raise ConfigError(f"repa.proj_coeff must be >= 0, got {cfg.repa.proj_coeff}")
    _validate_encoder_depth(cfg)
    _validate_family(cfg)
    if cfg.repa.projector_kernel < 1 or cfg.repa.projector_kernel % 2 == 0:
        raise ConfigError(f"repa.projector_kernel must be a positive odd int, got {cfg.repa.projector_kernel}")
    gamma = cfg.repa.spatial_norm_gamma
    if gamma is not None and not 0.0 <= gamma <= 1.0:
        raise ConfigError(f"repa.spatial_norm_gamma must be in [0, 1] or null (off), got {gamma}")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {cfg.train.ema_decay}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas must have two values, got {cfg.optim.betas}")
    if cfg.train.keep_last < 1:
        raise ConfigError(f"train.keep_last must be >= 1, got {cfg.train.keep_last}")
    _validate_vae(cfg)


def _validate_vae(cfg: Config) -> None:
    """The latent normalisation and REPA-E's end-to-end VAE tuning."""
    v = cfg.vae
    if v.latent_norm == "batchnorm" and (v.name.lower() == "none" or not 0.0 < v.bn_momentum <= 1.0):
        raise ConfigError("vae.latent_norm=batchnorm needs a VAE (vae.name) and 0 < vae.bn_momentum <= 1")
    if not v.tune:
        return
    problems = [
        (v.latent_norm != "batchnorm", "vae.tune=true needs vae.latent_norm=batchnorm (REPA-E)"),
        (cfg.repa.vae_coeff > 0 and cfg.repa.proj_coeff <= 0,
         "vae.tune=true with repa.vae_coeff > 0 needs repa.proj_coeff > 0 (the projector the VAE aligns through)"),
        (cfg.repa.vae_coeff < 0, "repa.vae_coeff must be >= 0"),
        (cfg.train.grad_accum != 1, "vae.tune=true runs whole batches: set train.grad_accum=1"),
        (cfg.train.precision == "fp16", "vae.tune=true supports train.precision=bf16 or fp32 (one loss scaler only)"),
        (cfg.objective.kind != "flow", "vae.tune=true trains SiT (objective.kind=flow), as REPA-E"),
        (cfg.reg.cls_coeff > 0 or cfg.haste.attn_coeff > 0,
         "vae.tune=true runs REPA-E's step, which has no REG class token or HASTE attention term: set "
         "reg.cls_coeff=0 and haste.attn_coeff=0"),
    ]
    for failed, msg in problems:
        if failed:
            raise ConfigError(msg)


def _validate_encoder_depth(cfg: Config) -> None:
    """``repa.encoder_depth`` by the model's rule (:func:`~repa_probe.models.transformer.encoder_depth_problem`),
    at read time so that a sweep or study fails before training; an unknown ``model.name`` is left to the model
    registry's error."""
    try:
        depth = cfg.model.depth or model_kwargs(cfg.model.name)["depth"]
    except ModelInputError:
        depth = None
    problem = encoder_depth_problem(cfg.repa.encoder_depth, depth)
    if problem is not None:
        raise ConfigError(f"repa.{problem}; set repa.encoder_depth to a block in 1..{depth or 'depth'}")


def _validate_family(cfg: Config) -> None:
    """REG and HASTE options (their block lists are checked against the model and encoder when built)."""
    h = cfg.haste
    if cfg.reg.cls_coeff < 0 or h.attn_coeff < 0:
        raise ConfigError(f"reg.cls_coeff and haste.attn_coeff must be >= 0, got {cfg.reg.cls_coeff}, {h.attn_coeff}")
    if cfg.reg.cls_coeff > 0 and (cfg.objective.kind != "flow" or cfg.repa.projector != "mlp"):
        raise ConfigError("REG (reg.cls_coeff > 0) needs objective.kind=flow and repa.projector=mlp (its class token "
                          "is a flow-matching token and makes the token grid non-square)")
    if h.stop_step is not None and h.stop_step < 0:
        raise ConfigError(f"haste.stop_step must be >= 0 or null (never), got {h.stop_step}")
    if h.attn_coeff > 0 and (len(h.student_blocks) != len(h.teacher_layers) or not h.student_blocks
                             or min(h.student_blocks + h.teacher_layers) < 1):
        raise ConfigError(f"haste.student_blocks {h.student_blocks} and haste.teacher_layers {h.teacher_layers} must "
                          "be equally long lists of 1-based block numbers")


def uses_encoder(cfg: Config) -> bool:
    """Whether training runs the target encoder: REPA, REG (its class token) or HASTE's attention alignment."""
    return cfg.repa.proj_coeff > 0 or cfg.reg.cls_coeff > 0 or cfg.haste.attn_coeff > 0


def to_dict(cfg: Config) -> dict:
    """The config as plain nested dicts (for checkpoints and JSON)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(values: dict) -> Config:
    """Rebuild a Config from ``to_dict`` output (e.g. stored in a checkpoint)."""
    check_keys(values, Config, "")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), values))  # type: ignore


def describe() -> str:
    """Every config key with its default and comment, for ``--help``."""
    import inspect
    import re

    src = inspect.getsource(inspect.getmodule(describe))  # type: ignore[arg-type]
    comments = {}
    current = None
    for line in src.splitlines():
        m = re.match(r"class (\w+)Config\(?", line)
        if m:
            current = m.group(1).lower()
            continue
        m = re.match(r"\s+(\w+): [^=]+= .*?(?:# (.*))?$", line)
        if m and current:
            comments[f"{current}.{m.group(1)}"] = m.group(2) or ""
    lines = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            else:
                section = key.split(".")[-2]
                note = comments.get(f"{section.replace('_', '')}.{f.name}", "")
                lines.append(f"  {key:<28} {str(value):<14} {note}".rstrip())

    walk(Config(), "")
    return "\n".join(lines)
