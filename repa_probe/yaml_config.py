"""YAML files read into typed dataclasses, with ``key.sub=value`` overrides: the one loader of every config of
the project (training: :mod:`repa_probe.training.config`; sweeps and studies: :mod:`repa_probe.sweeps.config`,
:mod:`repa_probe.sweeps.study`). An unknown key is an error listing the valid ones at its level."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from repa_probe.errors import ReproError


class ConfigError(ReproError, ValueError):
    """A configuration problem, reported in one line."""


def check_keys(values: Any, schema: type, prefix: str) -> None:
    """Raise ConfigError for any key of ``values`` (nested dict) that ``schema`` does not define."""
    if not isinstance(values, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, sub in values.items():
        where = f"{prefix}{key}"
        if key not in fields:
            level = prefix.rstrip(".") or "top level"
            raise ConfigError(f"unknown config key '{where}'; valid keys at {level}: {', '.join(fields)}")
        ftype = fields[key].default_factory if dataclasses.is_dataclass(fields[key].default_factory) else None
        if ftype is not None:
            if sub is not None and not isinstance(sub, dict):
                raise ConfigError(f"config key '{where}' is a section; set its keys, e.g. {where}.<key>=...")
            check_keys(sub or {}, ftype, where + ".")


def _dotlist_to_dict(overrides: Sequence[str]) -> dict:
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': cannot parse value ({exc.__class__.__name__})") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override")
        node[parts[-1]] = value
    return out


def load_structured(schema: type, path: Optional[str] = None, overrides: Sequence[str] = ()) -> Any:
    """Read a YAML file (optional) into the dataclass ``schema`` and apply ``key.sub=value`` overrides.

    Generic over the schema (training, sweep and study configs share it). Unknown keys, wrong value types, a
    missing file and invalid YAML raise ConfigError (one line); value ranges are the caller's to check.
    """
    layers = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a YAML config (not UTF-8 text: a binary file?)") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config ({exc.strerror or exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        try:
            check_keys(data, schema, "")
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        layers.append(data)
    over = _dotlist_to_dict(overrides)
    check_keys(over, schema, "")
    layers.append(over)
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, *layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        msg = str(exc).splitlines()[0]
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"bad value for '{key}': {msg}" if key else msg) from None
