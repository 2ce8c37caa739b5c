"""Command line of the trainer: parse arguments, load the config, hand over to the library."""
from __future__ import annotations

import argparse
from typing import List, Optional

from repa_probe.errors import OneLineParser, add_debug_flags, one_line_errors, setup_logging
from repa_probe.training.config import describe, load_config, to_yaml

EPILOG = """\
overrides:
  Any config key can be set as key.sub=value after the options, e.g.
    python -m train --cfg configs/repa_sit.yaml run.out_dir=/scratch/runs train.steps=400000 repa.proj_coeff=0
  Unknown keys are an error that lists the valid keys at that level.

launch:
  one CPU or GPU:   python -m train --cfg CFG
  DDP:              torchrun --nproc_per_node=8 -m train --cfg CFG
  SLURM (submitit): python -m train --cfg CFG launch.mode=slurm launch.slurm.partition=gpu launch.slurm.nodes=4
  Resume:           the same command again (train.resume=auto continues from the run's latest checkpoint)

config keys (default = the embedded tiny CPU run):
{keys}
"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m train",
        description="Train a SiT or DiT diffusion transformer, with or without REPA. Without --cfg, trains "
                    "the embedded tiny default (a small SiT + REPA on the built-in shapes dataset, one CPU, "
                    "under a minute). Outputs go to {run.out_dir}/{run.name}/: config.yaml, checkpoints/, "
                    "metrics.jsonl, tb/, train.log.",
        epilog=EPILOG.format(keys=describe()), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default=None, help="YAML config file (e.g. configs/repa_sit.yaml); "
                   "default: the embedded tiny config")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--wait", action="store_true", help="with launch.mode=slurm/submitit_local: wait for the job")
    add_debug_flags(p)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides before and after flags
    # the library (torch, data, plotting) is imported after parsing: --help and usage errors stay instant
    from repa_probe.training import launch

    setup_logging(args.verbose)
    with one_line_errors(args.debug):
        cfg = load_config(args.cfg, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        result = launch.run(cfg, wait=args.wait)
    print(f"done: {result}")
    return 0
