"""`python -m analysis.segment`: linear segmentation probes (mIoU) on diffusion-transformer patch tokens.

Thin command line over :func:`repa_probe.analysis.probes.run.run_probes` (task "segmentation"); the parser is
:func:`analysis.probe.build_parser`. See `--help`.
"""
from __future__ import annotations

from typing import List, Optional

from analysis.probe import main as _main


def main(argv: Optional[List[str]] = None) -> int:
    return _main(argv, task="segmentation")


if __name__ == "__main__":
    raise SystemExit(main())
