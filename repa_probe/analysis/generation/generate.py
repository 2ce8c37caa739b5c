"""Sampling to a folder: ``{index:06d}.png`` per sample, an ADM-style ``samples.npz`` and ``grid.png``.

Sample ``i`` is a pure function of ``(seed, i)``: its initial noise, its label (``random``) and every per-step
noise of the SDE / DDPM come from the counter-based :func:`repa_probe.sampling.noise.seeded_noise`, so any
sample is reproducible alone, whatever the batch size, the device or the number of processes (``rank`` /
``world`` shard the indices ``i ≡ rank mod world``). PNGs are written atomically, so a folder interrupted
half-way holds only complete images; running again samples only the missing indices. ``samples.npz``
(``arr_0`` uint8 ``N×H×W×3``, REPA's uint8 rule ``clamp(255 (x + 1) / 2)`` truncated) is written last, only
when all N images exist: its presence marks a complete folder.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from repa_probe.analysis.core.writers import atomic_write, write_text
from repa_probe.analysis.generation.fid_inputs import read_image
from repa_probe.sampling.noise import CLASS_TOKEN_KEY, seeded_noise
from repa_probe.analysis.errors import AnalysisInputError
from repa_probe.sampling import Sampler, methods_for, sample
from repa_probe.sampling.guidance import make_guidance

log = logging.getLogger("repa_probe")

SAMPLE_LABEL_MODES = ("balanced", "random")
SETTINGS_FILE, NPZ_FILE, GRID_FILE = "sampling.json", "samples.npz", "grid.png"
_STEP_KEY = 0x9E3779B1


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """What fixes the samples of a folder (with the model): recorded in ``sampling.json``."""

    num_samples: int
    method: str
    steps: int
    cfg_scale: float = 1.0
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    labels: str = "balanced"
    seed: int = 0
    cfg_channels: str | int = "auto"
    cls_cfg_scale: float | None = None  # REG models: the class token's guidance (None: cfg_scale; <= 0: conditional)
    timestep_shift: float = 0.0  # LightningDiT's shifted euler / heun grid (0 = off; theirs 0.3)

    def sampler(self, path: str = "linear") -> Sampler:
        """The :class:`~repa_probe.sampling.Sampler` these settings run, for a model of flow interpolant ``path``."""
        return Sampler(self.method, self.steps, self.cfg_scale, (self.guidance_low, self.guidance_high),
                       self.cfg_channels, path, cls_cfg_scale=self.cls_cfg_scale, timestep_shift=self.timestep_shift)

    def validate(self, convention: str) -> None:
        """Check the settings for a model of time ``convention`` (repa | sit | ddpm)."""
        if self.num_samples < 1:
            raise AnalysisInputError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.method not in methods_for(convention):
            kind = "DDPM (DiT)" if convention == "ddpm" else "flow"
            raise AnalysisInputError(f"--method {self.method!r} does not apply to a {kind} model: use one of "
                                f"{', '.join(methods_for(convention))}")
        if convention == "ddpm" and self.steps < 2:
            raise AnalysisInputError(f"--steps must be >= 2 for {self.method} (DiT), got {self.steps}")
        if self.labels not in SAMPLE_LABEL_MODES:
            raise AnalysisInputError(f"--labels must be one of {', '.join(SAMPLE_LABEL_MODES)}, got {self.labels!r}")
        if self.timestep_shift and (self.method not in ("euler", "heun") or not self.timestep_shift > 0):
            raise AnalysisInputError(f"--timestep-shift must be > 0 (0 = off) and applies to euler / heun, got "
                                     f"{self.timestep_shift} with --method {self.method}")


def default_method(convention: str) -> tuple[str, int]:
    """The official sampling scripts' defaults: REPA ``generate.py`` (ODE, 50 Euler steps) for flow models,
    DiT ``sample_ddp.py`` (250 DDPM steps). The REPA paper's FID protocol is ``sde`` with 250 steps."""
    return ("ddpm", 250) if convention == "ddpm" else ("euler", 50)


def sample_labels(indices: torch.Tensor, num_classes: int, mode: str, seed: int) -> torch.Tensor:
    """Labels ``(B,)`` int64 of samples ``indices``: ``balanced`` is ``i mod K`` (exactly N/K per class when K
    divides N); ``random`` is uniform, drawn from ``(seed, i)`` alone (REPA's protocol, reproducible per i)."""
    if num_classes < 1:
        return torch.zeros_like(indices)
    if mode == "balanced":
        return indices % num_classes
    z = seeded_noise(seed ^ 0x2545F491, indices, (1,), dtype=torch.float64)[:, 0]
    u = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))            # N(0,1) -> U(0,1)
    return (u * num_classes).long().clamp_(max=num_classes - 1)


class IndexedNoise:
    """Per-step noise of the samples ``indices``: step k of sample i depends only on ``(seed, k, i)``."""

    def __init__(self, seed: int, indices: torch.Tensor):
        self.seed, self.indices = seed, indices

    def __call__(self, step: int, like: torch.Tensor) -> torch.Tensor:
        key = (self.seed * 1_000_003 + (step + 1) * _STEP_KEY) & 0xFFFFFFFF
        return seeded_noise(key, self.indices, like.shape[1:], device=like.device, dtype=like.dtype)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] ``(B, 3, H, W)`` -> uint8 by REPA's rule ``clamp(255 (x + 1) / 2, 0, 255)``, truncated."""
    return torch.clamp(255.0 * (x.float() + 1.0) / 2.0, 0, 255).to(torch.uint8)


def _atomic_png(image: np.ndarray, path: Path) -> None:
    atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG"), binary=True)


def check_folder(out_dir: Path, settings: dict) -> None:
    """Create ``out_dir`` or check that an existing folder was made with the same settings (resume)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SETTINGS_FILE
    if path.exists():
        old = json.loads(path.read_text())
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise AnalysisInputError(f"{out_dir} holds samples made with other settings ({', '.join(diff)}): "
                                "use another --out or the same settings to resume")
    else:
        write_text(path, json.dumps(settings, indent=1, sort_keys=True))


def missing_indices(out_dir: Path, num_samples: int, rank: int = 0, world: int = 1) -> list[int]:
    """Indices of this process's share (``i ≡ rank mod world``) without a PNG yet."""
    have = {int(p.stem) for p in out_dir.glob("[0-9]*.png") if p.stem.isdigit()}
    return [i for i in range(rank, num_samples, world) if i not in have]


def decode(x: torch.Tensor, vae) -> torch.Tensor:
    """Final latents / pixels ``(B, C, h, w)`` -> uint8 images ``(B, 3, H, W)`` on the CPU."""
    if vae is None:
        if x.shape[1] != 3:
            raise AnalysisInputError(f"the model makes {x.shape[1]}-channel latents: pass --vae (or a run with one)")
        return to_uint8(x).cpu()
    return vae.decode(x.to(vae.device)).cpu()


@dataclasses.dataclass(frozen=True)
class Running:
    """How :func:`generate` runs: ``batch_size`` samples per batch, ``device``, this process's share of the
    indices (``rank`` of ``world``: ``i ≡ rank mod world``), ``progress`` bar, and ``finalize`` (build
    ``samples.npz`` when done; under torchrun rank 0 builds it after every rank finished)."""

    batch_size: int = 64
    device: str | torch.device = "cpu"
    rank: int = 0
    world: int = 1
    progress: bool = True
    finalize: bool = True


def generate(model, out_dir, settings: SamplerSettings, *, vae=None, path: str = "linear", meta: dict | None = None,
             running: Running = Running()) -> Path:
    """Sample ``settings.num_samples`` images of ``model`` into ``out_dir`` (see the module docstring).

    ``model``: any ``load_model`` model (moved to the device; bf16 autocast on CUDA); ``vae``: its decoder
    (None in pixel space); ``path``: its flow interpolant; ``meta``: recorded in ``sampling.json`` with the
    settings. Returns the ``samples.npz`` path (built by rank 0 once every PNG exists, unless
    ``running.finalize`` is False).
    """
    r = running
    batch_size, rank, world, progress = r.batch_size, r.rank, r.world, r.progress
    settings.validate(getattr(model, "time_convention", "repa"))
    make_guidance(model, settings.cfg_scale, (settings.guidance_low, settings.guidance_high), settings.cfg_channels,
                  model.in_channels)  # bad guidance options fail before anything is written
    out_dir = Path(out_dir)
    record = dict(dataclasses.asdict(settings), **(meta or {}))
    if rank == 0:
        check_folder(out_dir, record)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = missing_indices(out_dir, settings.num_samples, rank, world)
    device = torch.device(r.device)
    model = model.to(device)
    shape = (model.in_channels, model.input_size, model.input_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    bar = tqdm(total=len(todo), unit="img", desc=f"sampling {out_dir.name}", disable=not progress or rank != 0,
               dynamic_ncols=True)
    for start in range(0, len(todo), batch_size):
        idx = torch.tensor(todo[start:start + batch_size], dtype=torch.int64)
        noise = seeded_noise(settings.seed, idx, shape, device=device)
        labels = sample_labels(idx, model.num_classes, settings.labels, settings.seed).to(device)
        with autocast:
            x = sample(model, noise, labels, settings.sampler(path),
                       generator=IndexedNoise(settings.seed, idx.to(device)),
                       cls_noise=_class_token_noise(model, settings, idx, device))
        images = decode(x.float(), vae).permute(0, 2, 3, 1).numpy()
        for i, image in zip(idx.tolist(), images):
            _atomic_png(image, out_dir / f"{i:06d}.png")
        bar.update(len(idx))
    bar.close()
    npz = out_dir / NPZ_FILE
    if r.finalize and rank == 0 and (todo or not npz.exists()):  # a complete folder is left as it is
        build_npz(out_dir, settings.num_samples)
    return npz


def _class_token_noise(model, settings: SamplerSettings, idx: torch.Tensor, device) -> torch.Tensor | None:
    """REG models: the initial class-token noise ``(B, cls_token_dim)`` of samples ``idx`` (seeded like the
    latents' but independent of them); None for other models."""
    dim = getattr(model, "cls_token_dim", 0)
    return seeded_noise(settings.seed ^ CLASS_TOKEN_KEY, idx, (dim,), device=device) if dim else None


def load_pngs(out_dir: Path, num_samples: int) -> np.ndarray:
    """``{i:06d}.png`` for i < N as uint8 ``(N, H, W, 3)``; every image must exist and have the same size."""
    images, size = [], None
    for i in range(num_samples):
        p = out_dir / f"{i:06d}.png"
        if not p.exists():
            raise AnalysisInputError(f"{out_dir}: sample {p.name} is missing (run the sampling again to complete it)")
        a = read_image(p, str(out_dir))
        if size is not None and a.shape != size:
            raise AnalysisInputError(f"{out_dir}: {p.name} is {a.shape[1]}x{a.shape[0]} but the first sample is "
                                f"{size[1]}x{size[0]}; sample images must all have one size")
        size = a.shape
        images.append(a)
    return np.stack(images)


def build_npz(out_dir: Path, num_samples: int) -> Path:
    """Stack the PNGs into ``samples.npz`` (``arr_0``, no ``mu`` key) and write ``grid.png``; atomic."""
    arr = load_pngs(out_dir, num_samples)
    atomic_write(out_dir / NPZ_FILE, lambda f: np.savez(f, arr_0=arr), binary=True)
    save_grid(arr[:64], out_dir / GRID_FILE)
    return out_dir / NPZ_FILE


def save_grid(images: np.ndarray, path: Path) -> None:
    """Up to 64 images ``(n, H, W, 3)`` as one PNG grid (8 per row)."""
    n, h, w, _ = images.shape
    cols = min(8, n)
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    _atomic_png(grid, path)


# ------------------------------------------------------------------------------ checkpoints -> folders
def settings_for(convention: str, options) -> SamplerSettings:
    """The settings of a model of time ``convention`` from the sampler fields of ``options``
    (:class:`~repa_probe.analysis.generation.options.SampleOptions`; method / steps default per model)."""
    method, steps = default_method(convention)
    return SamplerSettings(options.num_samples, options.method or method, options.steps or steps,
                           options.cfg_scale, options.guidance_low, options.guidance_high, options.labels,
                           options.seed, options.cfg_channels, options.cls_cfg_scale, options.timestep_shift)


def check_entry(entry, settings: SamplerSettings) -> None:
    """Settings and guidance that fit the checkpoint ``entry`` (errors before anything is sampled)."""
    settings.validate(entry.info.time_convention)
    model = entry.meta_model()
    make_guidance(model, settings.cfg_scale, (settings.guidance_low, settings.guidance_high), settings.cfg_channels,
                  model.in_channels)


def sample_entry(entry, model, folder: Path, settings: SamplerSettings, dist, device, batch_size: int,
                 progress: bool) -> Path:
    """Sample the checkpoint ``entry`` (its ``model``, VAE and flow path) into ``folder``; under torchrun
    (``dist``) each rank samples its share and rank 0 builds ``samples.npz``. Returns the npz path."""
    meta = dict(checkpoint=str(entry.path), step=entry.info.step, time_convention=entry.info.time_convention,
                ema=entry.info.ema, vae=entry.vae_name)
    if entry.vae is not None:
        entry.vae.to(device)
    if dist.enabled:  # rank 0 checks / records the settings before anyone writes
        if dist.is_main:
            check_folder(folder, dict(dataclasses.asdict(settings), **meta))
        torch.distributed.barrier()
    npz = generate(model, folder, settings, vae=entry.vae, path=getattr(entry.objective, "path", "linear"), meta=meta,
                   running=Running(batch_size, device, dist.rank, dist.world_size, progress, not dist.enabled))
    if dist.enabled:
        torch.distributed.barrier()
        if dist.is_main:
            build_npz(folder, settings.num_samples)
        torch.distributed.barrier()
    return npz
