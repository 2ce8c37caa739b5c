"""Process launch: one process, torchrun DDP, or a SLURM job through submitit.

- ``launch.mode=local``: run in this process. Under ``torchrun`` (RANK / WORLD_SIZE in the environment) every
  process joins one DDP group: NCCL on GPUs, gloo on the CPU.
- ``launch.mode=slurm``: submit the same training through ``submitit.AutoExecutor`` (one task per GPU over
  ``launch.slurm.nodes`` nodes); on preemption or time-out submitit requeues the job, which resumes from the
  run's latest checkpoint (``train.resume=auto``).
- ``launch.mode=submitit_local``: the same submission path with submitit's local executor (tests, debugging).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

from repa_probe.training.config import from_dict, to_dict
from repa_probe.training.trainer import train

log = logging.getLogger("repa_probe")


class SubmititTrainJob:
    """A picklable callable that submitit runs on every task; ``checkpoint`` makes preemption requeue it."""

    def __init__(self, cfg_dict: dict):
        self.cfg_dict = cfg_dict

    def __call__(self) -> str:
        import submitit

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        cfg = from_dict(self.cfg_dict)
        cfg.launch.mode = "local"  # inside the job: train here
        return str(train(cfg))

    def checkpoint(self):  # called by submitit on preemption / time-out
        import submitit

        cfg = dict(self.cfg_dict)
        cfg["train"] = {**cfg["train"], "resume": "auto"}
        return submitit.helpers.DelayedSubmission(SubmititTrainJob(cfg))


def submit(cfg, wait: bool = False) -> str:
    """Submit training of ``cfg`` with submitit (``slurm`` or ``submitit_local``); returns the job id."""
    import submitit

    s = cfg.launch.slurm
    folder = Path(cfg.run.out_dir) / cfg.run.name / "submitit"
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.launch.mode == "submitit_local":
        executor = submitit.AutoExecutor(folder=str(folder), cluster="local")
        executor.update_parameters(timeout_min=s.timeout_min, tasks_per_node=1, nodes=1, gpus_per_node=0)
    else:
        executor = submitit.AutoExecutor(folder=str(folder), slurm_max_num_timeout=s.max_requeue)
        extra = {k: v for k, v in {"slurm_partition": s.partition, "slurm_account": s.account,
                                   "slurm_qos": s.qos, "slurm_constraint": s.constraint,
                                   "mem_gb": s.mem_gb}.items() if v is not None}
        executor.update_parameters(nodes=s.nodes, gpus_per_node=s.gpus_per_node,
                                   tasks_per_node=s.gpus_per_node, cpus_per_task=s.cpus_per_task,
                                   timeout_min=s.timeout_min, name=cfg.run.name, **extra)
    job = executor.submit(SubmititTrainJob(to_dict(cfg)))
    log.info("submitted job %s (logs in %s)", job.job_id, folder)
    if wait:
        job.result()
    return job.job_id


def run(cfg, train_fn: Optional[Callable] = None, wait: bool = False):
    """Dispatch by ``cfg.launch.mode``; returns the run directory (local) or the job id (submitit)."""
    if cfg.launch.mode in ("slurm", "submitit_local"):
        return submit(cfg, wait=wait)
    return (train_fn or train)(cfg)
