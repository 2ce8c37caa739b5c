"""Time: the one place that maps user time to what each model receives, and back.

User time, everywhere a person reads or writes one (command lines, CSV tables, figures): ``t`` in [0, 1],
``t = 0`` clean data and ``t = 1`` pure noise (REPA's convention), for every model. A DDPM step can be named
exactly as ``step:N`` (DiT models only). A bare integer other than 0 or 1 is refused: ``2`` could mean
step 2 or t = 2, so the user writes ``step:2`` or ``0.002``.

A model's *time convention* (``DiffusionTransformer.time_convention``) says what its time embedder expects:

========  ============================================  ==========================  ===================
name      models                                        process time (add_noise)    network input
========  ============================================  ==========================  ===================
``repa``  ours (flow), sihyun-yu/REPA                   t (float)                   t
``sit``   official willisma/SiT (t = 0 noise)           t (float)                   1 - t
``ddpm``  DiT, ours with ``objective.kind=ddpm``        step round(t * (T - 1))     step (int64)
========  ============================================  ==========================  ===================

*Process time* is what the objective's ``add_noise`` takes (FlowMatching: REPA time; GaussianDiffusion: the
integer step); *network input* is what ``model(x_t, t, y)`` takes. :func:`model_times` gives both.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import textwrap
from typing import Iterable, Union

import torch

from repa_probe.errors import ReproError

CONVENTIONS = ("repa", "sit", "ddpm")
#: the ``--family`` names of official code bases and the convention each one uses (also: old model configs)
FAMILY_CONVENTIONS = {"REPA": "repa", "SiT": "sit", "DiT": "ddpm"}
DDPM_STEPS = 1000
STEP_PREFIX = "step:"

#: the one description of time, used by every ``--help`` that mentions time
TIME_HELP = textwrap.fill(
    "Time: t = 0 is clean data, t = 1 is pure noise (REPA's convention), for every model. Our and REPA "
    "models receive t, official SiT models (whose t = 0 is noise) receive 1 - t, DiT models the DDPM step "
    "round(t*999). A DDPM step can be named exactly as step:N (e.g. step:250, DiT only). A bare integer "
    "other than 0 or 1 is refused as ambiguous. Output tables and figures label times as you wrote them.",
    width=106)


class TimeError(ReproError, ValueError):
    """A time value that cannot be read or does not fit the model (one-line message)."""


@dataclasses.dataclass(frozen=True)
class Step:
    """An explicit DDPM step, written ``step:N`` (``N`` in 0..T-1)."""

    n: int

    def __str__(self) -> str:
        return f"{STEP_PREFIX}{self.n}"


UserTime = Union[float, Step]


def check_convention(name: str) -> str:
    """``name`` if it is a time convention, else :class:`TimeError` listing them."""
    if name not in CONVENTIONS:
        raise TimeError(f"time convention must be one of {', '.join(CONVENTIONS)}, got {name!r}")
    return name


def convention_of(family_or_convention: str) -> str:
    """``"SiT"`` / ``"DiT"`` / ``"REPA"`` (code base, as in ``--family`` and old model configs) or a convention
    name -> the convention name."""
    value = FAMILY_CONVENTIONS.get(family_or_convention, family_or_convention)
    if value not in CONVENTIONS:
        raise TimeError(f"unknown family / time convention {family_or_convention!r}; choose from "
                        f"{', '.join([*FAMILY_CONVENTIONS, *CONVENTIONS])}")
    return value


# --------------------------------------------------------------------------------------------- parsing
def _ambiguous(n: int, option: str) -> TimeError:
    return TimeError(f"{option}: {n!r} is ambiguous: write {STEP_PREFIX}{n} for DDPM step {n} or "
                     f"{n / (DDPM_STEPS - 1):.3g} for t = {n / (DDPM_STEPS - 1):.3g} (t in [0, 1])")


def parse_time(value, option: str = "--timesteps") -> UserTime:
    """One user time: ``"0.5"`` / ``0.5`` -> 0.5, ``"step:250"`` / ``Step(250)`` -> ``Step(250)``.

    Floats must lie in [0, 1]; integers are accepted only as 0 or 1 (anything else is ambiguous).
    """
    if isinstance(value, Step):
        return value
    if isinstance(value, str):
        tok = value.strip()
        if tok.lower().startswith(STEP_PREFIX):
            n = tok[len(STEP_PREFIX):].strip()
            if not n.isdigit():
                raise TimeError(f"{option}: {tok!r} is not a DDPM step (write step:N with N an integer >= 0)")
            return Step(int(n))
        if tok.lstrip("+-").isdigit():
            value = int(tok)
        else:
            try:
                value = float(tok)
            except ValueError:
                raise TimeError(f"{option}: {tok!r} is not a time (give t in [0, 1] like 0,0.25,0.5 or "
                                f"{STEP_PREFIX}N)") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TimeError(f"{option}: {value!r} is not a time (give t in [0, 1] or {STEP_PREFIX}N)")
    if isinstance(value, numbers.Integral) and value not in (0, 1):
        raise _ambiguous(int(value), option)
    value = float(value)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise TimeError(f"{option}: t = {value:g} must lie in [0, 1] (0 = clean data, 1 = pure noise)")
    return value


def parse_times(values, option: str = "--timesteps") -> list[UserTime]:
    """A comma list (``"0,0.5,step:250"``) or a sequence of times -> a non-empty list of :data:`UserTime`."""
    if isinstance(values, str):
        items = [s for s in values.split(",") if s.strip()]
    elif isinstance(values, torch.Tensor):
        items = values.reshape(-1).tolist()
    elif isinstance(values, (numbers.Real, Step)):
        items = [values]
    else:
        items = list(values)
    if not items:
        raise TimeError(f"{option}: no times given")
    return [parse_time(v, option) for v in items]


def label(t: UserTime) -> float | str:
    """How a time is written in tables: the float itself, or ``"step:N"``."""
    return str(t) if isinstance(t, Step) else float(t)


def as_float(t: UserTime) -> float:
    """A time as a number in [0, 1] for axes and sorting: ``step:N`` -> ``N / 999``."""
    return t.n / (DDPM_STEPS - 1) if isinstance(t, Step) else float(t)


# --------------------------------------------------------------------------------------------- mapping
def process_time(times: Iterable[UserTime], convention: str, num_steps: int = DDPM_STEPS) -> torch.Tensor:
    """User times -> the time of the noising process, a CPU tensor ``(N,)``.

    ``repa`` / ``sit``: float32 t (a ``step:N`` is an error: these models have no steps). ``ddpm``: int64
    step ``round(t * (num_steps - 1))`` (Python's round, half to even), ``step:N`` -> N (checked in range).
    """
    check_convention(convention)
    times = parse_times(times)
    if convention != "ddpm":
        steps = [str(t) for t in times if isinstance(t, Step)]
        if steps:
            raise TimeError(f"{steps[0]} names a DDPM step, but this model uses float time ({convention}): "
                            "give t in [0, 1]")
        return torch.tensor([float(t) for t in times], dtype=torch.float32)
    last = int(num_steps) - 1
    out = []
    for t in times:
        if isinstance(t, Step):
            if not 0 <= t.n <= last:
                raise TimeError(f"{t} is outside the schedule's steps 0..{last}")
            out.append(t.n)
        else:
            out.append(int(round(t * last)))
    return torch.tensor(out, dtype=torch.int64)


def model_input(t: torch.Tensor, convention: str) -> torch.Tensor:
    """Process time ``t: (B,)`` -> what the network's time embedder receives ``(B,)``: ``1 - t`` for ``sit``,
    ``t`` unchanged otherwise."""
    return 1.0 - t if check_convention(convention) == "sit" else t


def model_times(times: Iterable[UserTime], convention: str,
                num_steps: int = DDPM_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """User times -> ``(process time, network input)``, two CPU tensors ``(N,)``."""
    t = process_time(times, convention, num_steps)
    return t, model_input(t, convention)


def user_time(t: torch.Tensor, convention: str, num_steps: int = DDPM_STEPS) -> torch.Tensor:
    """Process time ``(N,)`` -> user time ``(N,)`` float in [0, 1] (for labels): ``ddpm`` steps / (T - 1)."""
    if check_convention(convention) == "ddpm":
        return t.double() / (int(num_steps) - 1)
    return t.double()


def check_objective(convention: str, objective) -> None:
    """:class:`TimeError` unless ``objective`` noises in the process time of ``convention`` (GaussianDiffusion
    for ``ddpm``, FlowMatching for ``repa`` / ``sit``)."""
    kind = getattr(objective, "time_convention", None)
    if (check_convention(convention) == "ddpm") != (kind == "ddpm"):
        raise TimeError(f"a model with time convention {convention!r} does not fit objective {objective!r}: "
                        "ddpm models need GaussianDiffusion, repa / sit models FlowMatching")


def repa_time_to_sit(t: torch.Tensor) -> torch.Tensor:
    """REPA time (t = 0 data) -> official SiT time (t = 0 noise): ``1 - t``. Any shape."""
    return 1.0 - t


def sit_time_to_repa(t_sit: torch.Tensor) -> torch.Tensor:
    """Official SiT time (t = 0 noise) -> REPA time (t = 0 data): ``1 - t_sit``. Any shape."""
    return 1.0 - t_sit
