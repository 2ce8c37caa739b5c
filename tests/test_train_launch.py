"""The training command line and its launchers: one-line errors, --help, submitit (local executor, preemption
requeue) and torchrun DDP against one process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repa_probe.checkpoint import safe_load
from repa_probe.training.config import load_config, to_dict
from repa_probe.training.trainer import train
from train.cli import main as train_main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.log_every=2", "data.num_samples=64", "train.batch_size=16", "train.tensorboard=false",
        "model.depth=3", "model.hidden_size=32", "model.num_heads=2", "repa.projector_dim=32"]


@pytest.mark.parametrize("args, expected", [
    (["train.stepz=3"], "valid keys at train: steps"),
    (["data.name=repa"], "set data.root="),
    (["encoder.input_size=30"], "input_size 30 is not a multiple of 4"),
    (["train.steps=three"], "train.steps"),
    (["train.compile=maybe"], "train.compile='maybe' is not one of: auto, true, false"),
    (["--cfg", "configs/nope.yaml"], "config file not found"),
    (["repa.encoder_depth=9"], "repa.encoder_depth=9 is larger than the model depth"),
    (["encoder.name=dinov2_vits14", "encoder.pretrained=true"], "encoder.weights"),
    (["vae.name=stabilityai/sd-vae-ft-mse", "data.resolution=64"], "vae.name"),
])
def test_bad_input_is_one_line_error(tmp_path, capsys, args, expected):
    with pytest.raises(SystemExit) as exc:
        train_main([f"run.out_dir={tmp_path}", *FAST, "train.steps=1", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and expected in err


def test_unwritable_out_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exc:
        train_main([f"run.out_dir={blocker}/sub", *FAST, "train.steps=1"])
    assert exc.value.code == 2 and "not writable" in capsys.readouterr().err


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit):
        train_main(["--help"])
    out = capsys.readouterr().out
    for key in ("run.out_dir", "train.steps", "repa.proj_coeff", "launch.slurm.partition", "encoder.weights"):
        assert key in out


def test_submitit_local_executor(tmp_path):
    rc = train_main([f"run.out_dir={tmp_path}", "run.name=sub", *FAST, "train.steps=2", "train.ckpt_every=2",
                     "launch.mode=submitit_local", "--wait"])
    assert rc == 0
    assert (tmp_path / "sub/checkpoints/0000002.pt").is_file()


def test_torchrun_ddp_matches_single_process(tmp_path, free_port):
    """2 gloo processes, each running its 8 samples as 2 micro-batches of 4 (DDP's no_sync on the first),
    match one process on the same global batch of 16 without accumulation."""
    common = [*FAST, "train.steps=3", "train.ckpt_every=3", "train.log_every=3", "data.num_workers=0"]
    train(load_config(None, [f"run.out_dir={tmp_path}", "run.name=single", *common]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port}",
           "-m", "train", f"run.out_dir={tmp_path}", "run.name=ddp", *common, "train.grad_accum=2"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    a = safe_load(tmp_path / "single/checkpoints/0000003.pt")["model"]
    b = safe_load(tmp_path / "ddp/checkpoints/0000003.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_submitit_preemption_requeues_with_resume_auto():
    from repa_probe.training.launch import SubmititTrainJob

    cfg = to_dict(load_config(None, ["train.resume=none", "train.steps=7"]))
    delayed = SubmititTrainJob(cfg).checkpoint()
    job = delayed.function
    assert isinstance(job, SubmititTrainJob)
    assert job.cfg_dict["train"]["resume"] == "auto" and job.cfg_dict["train"]["steps"] == 7
    assert cfg["train"]["resume"] == "none"  # the original job's config is untouched
