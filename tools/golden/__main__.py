"""CLI: build small random models with the official DiT / SiT / REPA / platonic-rep code and write golden files.

    python -m tools.golden --dit /work/official/DiT --sit /work/official/SiT --repa /work/official/REPA \\
        --platonic /work/official/platonic-rep --out tests/data/golden

Imports each part module that exists among tools.golden.{models,losses,metrics,sampling,spatial,reg,haste} and calls
its ``write(out_dir, repos)``; then writes ``README.md`` in the output folder (repositories, commits, versions,
the command and the files of this run). Runs on the CPU. See tools/README.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the official code runs on the CPU here, whatever the machine

import argparse  # noqa: E402
import importlib  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from tools.golden.common import commit_of, log  # noqa: E402

PARTS = ("models", "losses", "metrics", "sampling", "spatial", "reg", "haste", "lightningdit", "repae")
REPOS = {  # CLI key -> GitHub repository of the official code
    "dit": "facebookresearch/DiT", "sit": "willisma/SiT", "repa": "sihyun-yu/REPA",
    "platonic": "minyoungg/platonic-rep", "irepa": "End2End-Diffusion/iREPA", "reg": "Martinser/REG",
    "haste": "NUS-HPC-AI-Lab/HASTE", "lightningdit": "hustvl/LightningDiT",
    "repae": "End2End-Diffusion/REPA-E",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.golden", description=__doc__.split("\n\n")[0])
    for key, name in REPOS.items():
        p.add_argument(f"--{key}", type=Path, default=None, metavar="PATH",
                       help=f"checkout of github.com/{name} (outside this repository); parts that need it "
                            "are skipped without it")
    p.add_argument("--out", type=Path, default=Path("tests/data/golden"), help="output folder (default: %(default)s)")
    p.add_argument("--commit", action="append", default=[], metavar="KEY=SHA",
                   help="commit of a checkout that is not a git work tree (e.g. made with git archive), for README.md")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run (default: all that exist)")
    return p.parse_args(argv)


def discover(names) -> dict[str, object]:
    """Import each existing part module; a missing one (not written yet in this branch) is skipped with a notice."""
    found = {}
    for name in names:
        module_name = f"tools.golden.{name}"
        try:
            found[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise  # the part exists but one of its own imports is missing: a real error
            log.info("golden part %r not present (%s.py), skipped", name, module_name)
    return found


def readme(args, repos, commits, written: dict[str, list[Path]]) -> str:
    """README.md text for the output folder."""
    timm_spec = importlib.util.find_spec("timm")  # their models are built from timm layers: its version matters
    timm_dir = Path(timm_spec.origin).parent if timm_spec else None
    timm_version = importlib.metadata.version("timm") if timm_spec else "absent"
    argv = ["python", "-m", "tools.golden", *sys.argv[1:]]
    lines = ["# Golden files from the official code", "",
             "Written by `tools/golden/`; do not edit by hand: rerun the command below (the full recipe, with "
             "the checkouts and the timm it needs, is in `tools/README.md`). `tests/test_golden.py` checks this "
             "project against these files.", "",
             "| key | repository | commit | checkout used |", "|---|---|---|---|"]
    lines += [f"| {k} | github.com/{REPOS[k]} | `{commits[k]}` | `{repos[k] or '-'}` |" for k in REPOS]
    lines += ["", f"Command: `{shlex.join(argv)}`", "",
              f"Python {platform.python_version()}, torch {torch.__version__}, timm {timm_version} ({timm_dir}), "
              f"numpy {importlib.metadata.version('numpy')}, CPU, float32 models.", "",
              "| file | part | bytes |", "|---|---|---|"]
    for part, files in written.items():
        lines += [f"| `{f.name}` | {part} | {f.stat().st_size} |" for f in files]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    repos = {k: (getattr(args, k).resolve() if getattr(args, k) else None) for k in REPOS}
    for key, path in repos.items():
        if path is not None and not path.is_dir():
            sys.exit(f"--{key} {path}: not a directory")
    given = dict(c.split("=", 1) for c in args.commit)
    commits = {k: commit_of(repos[k], given, k) for k in REPOS}
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        sys.exit(f"--parts: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, module in discover(names).items():
        files = module.write(args.out, repos, commits=commits)
        written[name] = files
        log.info("part %s: %d file(s)", name, len(files))
    big = [f"{f} ({f.stat().st_size} bytes)" for fs in written.values() for f in fs if f.stat().st_size > 2_000_000]
    if big:
        log.warning("golden files over 2 MB: %s", ", ".join(big))
    (args.out / "README.md").write_text(readme(args, repos, commits, written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
