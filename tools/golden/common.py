"""Helpers shared by the golden-file parts: importing official code by path, seeding, writing files.

The official repositories are plain source trees, not installed packages, and several of them have a
top-level ``models.py``; each file is therefore imported under its own unique module name
(``golden_dit.models``, ``golden_repa.models.sit``...) so that the repositories never shadow one another
or this project. Nothing in the official trees is modified; everything runs on the CPU in float32.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Iterator

import torch

log = logging.getLogger("tools.golden")


class GoldenError(RuntimeError):
    """An official checkout is missing a file the golden part needs (one-line message)."""


def import_file(name: str, path: Path) -> types.ModuleType:
    """Import the source file ``path`` as module ``name`` (cached in ``sys.modules``).

    A package directory (``path`` is a folder) is imported from its ``__init__.py`` so that its relative
    imports (``from . import gaussian_diffusion``) resolve inside it.
    """
    if name in sys.modules:
        return sys.modules[name]
    path = Path(path)
    is_package = path.is_dir()
    file = path / "__init__.py" if is_package else path
    if not file.is_file():
        raise GoldenError(f"{file}: not found (is the checkout complete?)")
    spec = importlib.util.spec_from_file_location(
        name, file, submodule_search_locations=[str(path)] if is_package else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@contextlib.contextmanager
def stub_modules(*names: str, **attributes: Any) -> Iterator[list[str]]:
    """Provide empty stand-in modules for optional dependencies that are not installed.

    Only the names that cannot be imported are stubbed (and reported in the yielded list); the stubs are
    removed again on exit. ``attributes`` maps ``"module.attr"`` to a value set on a stub.
    """
    stubbed = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            stubbed.append(name)
            sys.modules[name] = types.ModuleType(name)
            parent, _, child = name.rpartition(".")
            if parent in sys.modules:
                setattr(sys.modules[parent], child, sys.modules[name])
    for dotted, value in attributes.items():
        mod, _, attr = dotted.rpartition(".")
        if mod in stubbed:
            setattr(sys.modules[mod], attr, value)
    if stubbed:
        log.info("stubbed missing optional dependencies: %s", ", ".join(stubbed))
    try:
        yield stubbed
    finally:
        for name in stubbed:
            sys.modules.pop(name, None)


@contextlib.contextmanager
def repo_on_path(repo: Path, stub_torchdiffeq: bool = False):
    """Import from ``repo`` by its own top-level names (``models``, ``diffusion``, ``transport`` collide across
    repositories): the repo goes first on ``sys.path``, and its modules are dropped from ``sys.modules`` on exit.
    ``stub_torchdiffeq``: a stand-in ``torchdiffeq`` for code that imports it but never calls ``odeint``."""
    before = set(sys.modules)
    sys.path.insert(0, str(repo))
    if stub_torchdiffeq and "torchdiffeq" not in sys.modules:
        sys.modules["torchdiffeq"] = types.SimpleNamespace(odeint=None)
    try:
        yield
    finally:
        sys.path.remove(str(repo))
        own = {p.stem for p in repo.iterdir()} | ({"torchdiffeq"} if stub_torchdiffeq else set())
        for name in set(sys.modules) - before:  # only the repo's own modules (torch imports lazily too)
            if name.split(".")[0] in own:
                del sys.modules[name]


def commit_of(path: Path | None, given: dict[str, str] | None = None, key: str = "") -> str:
    """A checkout's commit: ``given[key]`` (``--commit KEY=SHA``) if there, else ``git rev-parse HEAD`` in it,
    else "unknown"; "-" without a checkout."""
    if given and key in given:
        return given[key]
    if path is None:
        return "-"
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git work tree; pass --commit KEY=SHA)"


def official_args(train_py: Path, argv: list[str]) -> argparse.Namespace:
    """The ``args`` Namespace their ``train.py`` would store in a checkpoint for ``argv``: runs only its
    ``parse_args`` function (the rest of the file imports accelerate, wandb... that a golden run does not need)."""
    tree = ast.parse(Path(train_py).read_text())
    funcs = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "parse_args"]
    if not funcs:
        raise GoldenError(f"{train_py}: no parse_args function")
    scope: dict = {"argparse": argparse}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), str(train_py), "exec"), scope)  # noqa: S102 - their code
    return scope["parse_args"](argv)


def random_model(cls, config: dict, seed: int) -> torch.nn.Module:
    """``cls(**config)`` with seeded random weights everywhere but ``pos_embed`` (:func:`randomize_`), eval mode."""
    gen = seed_all(seed)
    model = cls(**config)
    randomize_(model, gen)
    return model.eval()


def training_checkpoint(model: torch.nn.Module, ema: torch.nn.Module, train_py: Path, argv: list[str],
                        steps: int) -> dict:
    """``{model, ema, opt, args, steps}`` as REPA's train.py (and REG's, HASTE's) saves it: AdamW's state dict at
    their settings, ``args`` from their ``parse_args(argv)``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    return {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "args": official_args(train_py, argv), "steps": steps}


def need(repos: dict[str, Path], *keys: str, part: str) -> bool:
    """True when every repo in ``keys`` was given; otherwise log a notice naming the missing ones."""
    missing = [k for k in keys if repos.get(k) is None]
    if missing:
        log.warning("golden part %r skipped: no checkout given for %s (--%s PATH)", part,
                    ", ".join(missing), " PATH --".join(missing))
        return False
    return True


def seed_all(seed: int) -> torch.Generator:
    """Seed torch's global RNG (their code draws from it) and return a CPU generator with the same seed."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def randomize_(module: torch.nn.Module, generator: torch.Generator, skip: tuple[str, ...] = ("pos_embed",),
               scale: float = 1.0) -> None:
    """Give every parameter (also the zero-initialised adaLN / output layers) seeded random values.

    Weights get ``N(0, scale² / fan_in)`` (fan_in = all dims but the first), so activations stay O(1) at any
    depth; biases and 1-D parameters get ``N(0, 0.1²)``. Names in ``skip`` keep their value (the fixed sin-cos
    ``pos_embed`` is part of the official layout and is checked as such).
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in skip:
                continue
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            if p.ndim >= 2:
                p.copy_(noise * (scale / (p[0].numel() ** 0.5)))
            else:
                p.copy_(noise * 0.1)


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_pt(obj: dict, path: Path) -> Path:
    """Write a dict of tensors / plain values with ``torch.save`` (atomic); it must load with weights_only=True
    (with ``argparse.Namespace`` allowed, as ``repa_probe.checkpoint.safe_load`` allows it)."""
    tensors_only = {k: (v.detach().contiguous().clone() if torch.is_tensor(v) else v) for k, v in obj.items()}
    _atomic_write(Path(path), lambda f: torch.save(tensors_only, f))
    with torch.serialization.safe_globals([argparse.Namespace]):  # training checkpoints carry their args
        torch.load(path, weights_only=True)  # fail here, not in the tests, if something is not weights-only
    return Path(path)


def save_json(obj: Any, path: Path) -> Path:
    """Write ``obj`` as indented JSON (atomic)."""
    text = json.dumps(obj, indent=1, sort_keys=True) + "\n"
    _atomic_write(Path(path), lambda f: f.write(text.encode()))
    return Path(path)
