"""Inputs of FID evaluation: sample images (folder or ADM ``.npz``), references and cached statistics.

Images are uint8 ``(N, H, W, 3)`` (ADM's layout); torch-fidelity receives them as uint8 ``(3, H, W)`` items.
"""
from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import numpy as np
import torch

from repa_probe.analysis.errors import AnalysisInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# --------------------------------------------------------------------------------------------- images
class ImageArray(torch.utils.data.Dataset):
    """uint8 images ``(N, H, W, 3)`` served as torch-fidelity wants them: uint8 ``(3, H, W)`` tensors."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)


def check_layout(arr, what: str) -> np.ndarray:
    """``arr_0`` must be uint8 ``(N, H, W, 3)`` (ADM's layout)."""
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        desc = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise AnalysisInputError(f"{what}: arr_0 must be uint8 of shape (N, H, W, 3) (ADM layout), got {desc}")
    return arr


def read_image(path: Path, what: str = "--samples") -> np.ndarray:
    """One image file as uint8 ``(H, W, 3)``; an unreadable or truncated file is a :class:`AnalysisInputError` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise AnalysisInputError(f"{what}: {path} is not a readable image ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:80] if str(exc) else 'broken file'})") from None


def load_images(path, what: str = "--samples") -> np.ndarray:
    """A folder of PNG/JPEG images (sorted by name, one size) or an ``.npz`` with ``arr_0`` -> uint8 (N, H, W, 3)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and not q.name.startswith("."))
        if not files:
            raise AnalysisInputError(f"{what} {p}: no .png/.jpg images in the folder")
        images = [read_image(q, what) for q in files]
        sizes = {im.shape for im in images}
        if len(sizes) > 1:
            raise AnalysisInputError(f"{what} {p}: images have different sizes {sorted(s[:2] for s in sizes)[:3]}; "
                           "all samples must have one size")
        return np.stack(images)
    if p.suffix == ".npz" and p.is_file():
        with np.load(p) as z:
            if "arr_0" not in z:
                raise AnalysisInputError(f"{what} {p}: .npz without arr_0 (keys: {', '.join(z.files)})")
            return check_layout(z["arr_0"], f"{what} {p}")
    raise AnalysisInputError(f"{what} {p}: not an image folder or an .npz file")


def image_height(path) -> int:
    """Height of the first sample image of a folder or ``.npz`` (reads only the array header)."""
    from PIL import Image

    p = Path(path)
    if p.is_dir():
        first = next((q for q in sorted(p.iterdir()) if q.suffix.lower() in IMAGE_SUFFIXES), None)
        if first is None:
            raise AnalysisInputError(f"--samples {p}: no .png/.jpg images in the folder")
        return Image.open(first).size[1]
    try:
        with zipfile.ZipFile(p) as zf, zf.open("arr_0.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape = read(f)[0]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        raise AnalysisInputError(f"--samples {p}: not an image folder or an .npz with arr_0") from None
    if len(shape) != 4:
        raise AnalysisInputError(f"--samples {p}: arr_0 must be uint8 of shape (N, H, W, 3) (ADM layout), got {shape}")
    return int(shape[1])


@dataclasses.dataclass
class Reference:
    """What samples are compared with: images (uint8 N×H×W×3) and/or statistics per metric name."""

    name: str
    images: np.ndarray | None = None
    stats: dict = dataclasses.field(default_factory=dict)  # metric -> {"mu", "sigma", "n"}
    features: dict = dataclasses.field(default_factory=dict, repr=False)  # metric -> (N, D) features of images


def read_reference(path) -> Reference:
    """``--ref``: an ADM reference ``.npz`` (``mu``/``sigma`` = Inception pool3 statistics, optional
    ``arr_0``), an ``.npz`` of images, an image folder, or a ``reference_stats.pt`` cache."""
    from repa_probe.checkpoint import safe_load

    p = Path(path)
    if p.suffix == ".pt":
        stats = safe_load(p)
        if not isinstance(stats, dict) or not all(isinstance(v, dict) and {"mu", "sigma"} <= set(v)
                                                  for v in stats.values()):
            raise AnalysisInputError(f"--ref {p}: not a reference statistics file (metric -> mu, sigma)")
        return Reference(str(p), stats={k: {kk: np.asarray(vv) for kk, vv in v.items()} for k, v in stats.items()})
    if p.suffix == ".npz" and p.is_file():
        with np.load(p) as z:
            keys = set(z.files)
            if ("mu" in keys) != ("sigma" in keys):
                raise AnalysisInputError(f"--ref {p}: has {'mu' if 'mu' in keys else 'sigma'} but not "
                               f"{'sigma' if 'mu' in keys else 'mu'} (an ADM reference batch has both)")
            if "mu" in keys:
                mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
                if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
                    raise AnalysisInputError(f"--ref {p}: mu {mu.shape} / sigma {sigma.shape} are not (D,) / (D, D)")
                images = check_layout(z["arr_0"], f"--ref {p}") if "arr_0" in keys else None
                return Reference(str(p), images, {"fid_inception": {"mu": mu, "sigma": sigma, "n": None}})
            if "arr_0" not in keys:
                raise AnalysisInputError(f"--ref {p}: .npz has neither mu/sigma (ADM reference) nor arr_0 (images)")
    return Reference(str(p), load_images(p, "--ref"))


def save_reference_stats(ref: Reference, path: Path) -> None:
    """Cache the reference statistics (``--ref`` accepts the file later)."""
    from repa_probe.checkpoint import atomic_save

    atomic_save({k: {"mu": torch.as_tensor(v["mu"]), "sigma": torch.as_tensor(v["sigma"]),
                     "n": -1 if v.get("n") is None else int(v["n"])} for k, v in ref.stats.items()}, path)
