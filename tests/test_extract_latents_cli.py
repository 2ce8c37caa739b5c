"""`python -m train.extract_latents` writes REPA's layout, and the trainer trains on it (data.name=repa)."""
import numpy as np
import pytest

from repa_probe.training import rundir
from repa_probe.training.config import load_config
from repa_probe.data import REPAFeatureDataset
from repa_probe.training.trainer import train
from train.extract_latents import main


def test_extract_then_train_on_repa_layout(tmp_path):
    out = tmp_path / "latents"
    rc = main(["--data", "shapes", "--resolution", "32", "--num-samples", "32", "--out", str(out),
               "--vae", "random:tiny", "--batch-size", "16", "--num-workers", "0", "--device", "cpu"])
    assert rc == 0
    ds = REPAFeatureDataset(str(out))
    assert len(ds) == 32 and ds[0]["moments"].shape == (8, 4, 4)
    files = sorted((out / "vae-sd").rglob("img-mean-std-*.npy"))
    assert len(files) == 32 and np.load(files[0]).shape == (8, 4, 4)
    run = train(load_config(None, [f"run.out_dir={tmp_path}", "run.name=latent", "data.name=repa",
                                   f"data.root={out}", "data.num_samples=null", "vae.name=random:tiny",
                                   "model.patch_size=2", "model.depth=2", "model.hidden_size=32",
                                   "model.num_heads=2", "repa.encoder_depth=1", "repa.projector_dim=32",
                                   "encoder.input_size=8", "train.steps=2", "train.batch_size=16",
                                   "train.ckpt_every=2", "train.log_every=1", "train.tensorboard=false"]))
    rows = rundir.read_metrics(run)
    assert len(rows) == 2 and np.isfinite(rows[-1]["loss"])


def test_missing_vae_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--data", "shapes", "--resolution", "32", "--num-samples", "4", "--out", str(tmp_path / "o"),
              "--vae", "not-a-real-org/not-a-vae", "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, match", [
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--num-samples", "0"], "--num-samples must be an integer >= 1, got 0"),
    (["--resolution", "30"], "--resolution 30 is not a multiple of 8"),
    (["--vae", "random:big"], "valid: --vae random:tiny"),
    (["--data", "imagefolder"], "needs --data-root"),
])
def test_bad_flags_are_one_line_naming_this_commands_flags(tmp_path, capsys, argv, match):
    args = ["--data", "shapes", "--resolution", "32", "--num-samples", "4", "--vae", "random:tiny",
            "--out", str(tmp_path / "o"), "--device", "cpu", "--num-workers", "0"]
    with pytest.raises(SystemExit) as exc:
        main(args + argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and match in err, err
    assert "vae.name=" not in err and "root=" not in err and not (tmp_path / "o").exists()


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit):
        main(["--data", "shapes", "--resolution", "32", "--num-samples", "4", "--vae", "random:tiny",
              "--out", str(tmp_path / "f"), "--device", "cpu"])
    assert "--out" in capsys.readouterr().err and (tmp_path / "f").read_text() == "x"
