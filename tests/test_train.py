"""End-to-end tests of the trainer on tiny configs (CPU, seconds each)."""
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from PIL import Image

from repa_probe.checkpoint import CheckpointError, load_training_checkpoint, safe_load
from repa_probe.training import accel, rundir
from repa_probe.training.config import Config, ConfigError, load_config, to_dict
from repa_probe.training.distributed import DistInfo
from repa_probe.training.trainer import TrainingDiverged, TrainState, train, train_step, update_ema
from train.cli import main as train_main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.log_every=2", "data.num_samples=64", "train.batch_size=16", "train.tensorboard=false",
        "model.depth=3", "model.hidden_size=32", "model.num_heads=2", "repa.projector_dim=32"]


def cfg_for(tmp_path, *extra, name="r"):
    return load_config(None, [f"run.out_dir={tmp_path}", f"run.name={name}", *FAST, *extra])


def states_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_yaml_is_the_embedded_default_written_out_in_full():
    assert to_dict(load_config(str(ROOT / "configs/tiny.yaml"))) == to_dict(Config())

    def keys(d, prefix=""):
        return {k for key, v in d.items() for k in ([f"{prefix}{key}"] + (sorted(keys(v, f"{prefix}{key}."))
                                                                          if isinstance(v, dict) else []))}

    written = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    assert keys(written) == keys(to_dict(Config())), keys(to_dict(Config())) ^ keys(written)


def test_encoder_depth_is_checked_once_when_the_config_loads():
    with pytest.raises(ConfigError, match="repa.encoder_depth=5 is larger than the model depth 4"):
        load_config(None, ["repa.encoder_depth=5"])                   # tiny: depth 4, before anything is built
    with pytest.raises(ConfigError, match="repa.encoder_depth=29 is larger than the model depth 28"):
        load_config(None, ["model.name=SiT-XL/2", "model.depth=null", "repa.encoder_depth=29"])
    with pytest.raises(ConfigError, match="repa.encoder_depth must be positive"):
        load_config(None, ["repa.encoder_depth=0"])
    assert load_config(None, ["repa.encoder_depth=4"]).repa.encoder_depth == 4


@pytest.mark.parametrize("name", ["repa_sit", "repa_dit", "sit_baseline", "dit_baseline", "tiny"])
def test_shipped_configs_load(name):
    cfg = load_config(str(ROOT / f"configs/{name}.yaml"))
    if name == "tiny":  # the CPU demo: pixel space, built-in data, an explicitly random target
        assert (cfg.data.name, cfg.vae.name, cfg.encoder.pretrained, cfg.train.steps) == ("shapes", "none", False, 200)
        assert cfg.repa.proj_coeff == 0.5 and cfg.train.compile == "auto"
        return
    assert cfg.train.batch_size == 256 and cfg.optim.lr == 1e-4 and cfg.train.ema_decay == 0.9999
    assert cfg.repa.proj_coeff == (0.0 if "baseline" in name else 0.5)
    assert cfg.repa.encoder_depth == 8 and cfg.model.name.endswith("XL/2")


def test_cli_trains_and_writes_run_dir(tmp_path, capsys):
    rc = train_main([f"run.out_dir={tmp_path}", "run.name=cli", *FAST, "train.steps=4", "train.ckpt_every=2"])
    assert rc == 0
    run = tmp_path / "cli"
    steps = [s for s, _ in rundir.list_checkpoints(run / "checkpoints")]
    assert steps == [2, 4]
    assert (run / "config.yaml").is_file() and (run / "train.log").is_file()
    rows = rundir.read_metrics(run)
    assert [r["step"] for r in rows] == [2, 4]
    for key in ("loss", "denoise", "repa", "cos", "grad_norm", "images_per_s"):
        assert key in rows[0]
    assert -1.0 <= rows[-1]["repa"] <= 1.0
    ckpt = safe_load(run / "checkpoints/0000004.pt")
    assert ckpt["step"] == 4 and ckpt["config"]["run"]["name"] == "cli"
    # the EMA starts as an exact copy of the initial weights and trails the online model
    init = TrainState.build(cfg_for(tmp_path, name="init"), DistInfo(), torch.device("cpu")).model.state_dict()
    moved = {k: (ckpt["model"][k] - init[k]).norm() for k in init if k != "pos_embed"}
    ema_moved = {k: (ckpt["ema"][k] - init[k]).norm() for k in moved}
    assert sum(ema_moved.values()) > 0 and sum(ema_moved.values()) < 0.2 * sum(moved.values())
    assert torch.equal(ckpt["ema"]["pos_embed"], init["pos_embed"])


def test_update_ema_is_the_exponential_average():
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    update_ema(ema, model, 0.9)
    for e, b, m in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * m.detach(), rtol=0, atol=1e-7)


def test_resume_is_exact(tmp_path):
    common = ["train.ckpt_every=3", "train.keep_last=5"]
    train(cfg_for(tmp_path, "train.steps=6", *common, name="straight"))
    train(cfg_for(tmp_path, "train.steps=3", *common, name="split"))
    train(cfg_for(tmp_path, "train.steps=6", *common, name="split"))  # resume=auto from step 3
    a = safe_load(tmp_path / "straight/checkpoints/0000006.pt")
    b = safe_load(tmp_path / "split/checkpoints/0000006.pt")
    assert states_equal(a["model"], b["model"])
    assert states_equal(a["ema"], b["ema"])
    assert a["data"] == b["data"]
    assert torch.equal(a["rng"]["generator"], b["rng"]["generator"])
    # resumed run logged steps 3 → 6 only once each
    steps = [r["step"] for r in rundir.read_metrics(tmp_path / "split")]
    assert steps == [2, 3, 4, 6]


def test_vanilla_has_no_projector_and_ddpm_dit_trains(tmp_path):
    run = train(cfg_for(tmp_path, "train.steps=2", "train.ckpt_every=2", "repa.proj_coeff=0", name="vanilla"))
    ckpt = safe_load(run / "checkpoints/0000002.pt")
    assert not any(k.startswith("projectors") for k in ckpt["model"])
    run = train(cfg_for(tmp_path, "train.steps=2", "train.ckpt_every=2", "model.name=DiT-S/4",
                        "objective.kind=ddpm", name="dit"))
    ckpt = safe_load(run / "checkpoints/0000002.pt")
    assert ckpt["model_config"]["learn_sigma"] and ckpt["model_config"]["time_convention"] == "ddpm"
    assert any(k.startswith("projectors.0") for k in ckpt["model"])
    rows = rundir.read_metrics(run)
    assert {"mse", "vb", "repa"} <= set(rows[-1])



def test_compile_wraps_model_and_encoder_and_matches_eager(tmp_path, monkeypatch):
    """train.compile=true: torch.compile of the model and of the frozen encoder, compiled on a warm-up forward +
    backward that leaves the run untouched: the compiled run trains the same weights as the eager one and
    checkpoints keep the plain key names. Dynamo's "eager" backend keeps the test fast (no C++ compile); the
    wiring and the traced graphs are the real ones."""
    real_compile, real_warm_up, compiled, graphs, after_warm_up = torch.compile, accel._warm_up, [], [], []

    def eager_graphs(gm, example_inputs):  # Dynamo's "eager" backend, counting the graphs it is given
        graphs.append(gm)
        return gm.forward

    def eager_backend_compile(fn, **kwargs):
        compiled.append(type(fn).__name__)
        return real_compile(fn, backend=eager_graphs)

    monkeypatch.setattr(torch, "compile", eager_backend_compile)
    monkeypatch.setattr(accel, "_warm_up", lambda s: (real_warm_up(s), after_warm_up.append(len(graphs))))
    run = train(cfg_for(tmp_path, "train.steps=2", "train.ckpt_every=2", "train.compile=true", name="compiled"))
    assert sorted(compiled) == ["DiffusionTransformer", "TargetEncoder"]
    assert after_warm_up[0] >= 2 and len(graphs) == after_warm_up[0]  # compiled in the warm-up, never again
    monkeypatch.setattr(torch, "compile", real_compile)
    eager = train(cfg_for(tmp_path, "train.steps=2", "train.ckpt_every=2", name="eager"))
    a, b = (safe_load(r / "checkpoints/0000002.pt") for r in (run, eager))
    assert not any("_orig_mod" in k for k in a["model"])
    assert a["model"].keys() == b["model"].keys() and a["data"] == b["data"]
    assert torch.equal(a["rng"]["generator"], b["rng"]["generator"])  # the warm-up drew nothing
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6)


def test_compile_auto_means_cuda_only_and_failure_falls_back_to_eager(tmp_path, monkeypatch, caplog):
    cfg = cfg_for(tmp_path)
    assert cfg.train.compile == "auto"
    assert not accel.want_compile(cfg, torch.device("cpu")) and accel.want_compile(cfg, torch.device("cuda", 0))
    assert not accel.want_compile(cfg_for(tmp_path, "train.compile=false"), torch.device("cuda", 0))
    assert accel.want_compile(cfg_for(tmp_path, "train.compile=true"), torch.device("cpu"))

    class Broken(torch.nn.Module):  # what a compiler failure looks like: the first call raises
        def __init__(self, fn):
            super().__init__()

        def forward(self, *args):
            raise RuntimeError("backend compiler failed\nlong traceback ...")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: Broken(fn))
    caplog.set_level("INFO", logger="repa_probe")
    fell_back = train(cfg_for(tmp_path, "train.steps=2", "train.ckpt_every=2", "train.compile=true", name="fb"))
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "backend compiler failed" in warnings[0] and "\n" not in warnings[0]
    eager = train(cfg_for(tmp_path, "train.steps=2", "train.ckpt_every=2", "train.compile=false", name="e"))
    a, b = (safe_load(r / "checkpoints/0000002.pt") for r in (fell_back, eager))
    assert states_equal(a["model"], b["model"]) and states_equal(a["ema"], b["ema"])


def test_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """No .item() / bool() / float() / int() of a tensor inside train_step (each is a host sync on a GPU);
    losses are summed on the device and a non-finite one is only recorded. Fused AdamW."""
    s = TrainState.build(cfg_for(tmp_path, "model.class_dropout_prob=0.5"), DistInfo(), torch.device("cpu"))
    assert s.opt.defaults["fused"] is True
    s.batches.next()  # starts the CPU loader (which reads its seed once per epoch, on the host)
    reads = []
    for name in ("item", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _f=original: reads.append(_n) or _f(self, *a))
    logs = [train_step(s) for _ in range(2)]
    monkeypatch.undo()
    assert reads == [] and s.step == 2 and int(s.first_bad) == 0
    assert all(v.ndim == 0 and torch.isfinite(v) for v in logs[-1].values())


def test_label_range_check_never_reads_a_device_tensor():
    """The model checks the label range on the CPU (free) but not on other devices (a host sync per forward):
    on the meta device, which cannot be read back, the forward runs; REPA_PROBE_DEBUG=1 turns the check on."""
    from repa_probe.models import create_model

    with torch.device("meta"):
        model = create_model("SiT-S/4", depth=1, hidden_size=32, num_heads=2, input_size=8, num_classes=3)
        out, _ = model(torch.zeros(2, 4, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.int64))
    assert out.shape == (2, 4, 8, 8) and out.device.type == "meta"


def test_grad_accum_matches_one_big_batch(tmp_path):
    """train.grad_accum=4: same samples, noise and labels as one batch of 16, gradients summed over 4
    micro-batches of 4 → the same weights (to rounding), the same logged losses; bad splits are refused."""
    common = ["train.steps=3", "train.ckpt_every=3", "train.log_every=1"]
    one = train(cfg_for(tmp_path, *common, name="one"))
    four = train(cfg_for(tmp_path, *common, "train.grad_accum=4", name="four"))
    a, b = (safe_load(r / "checkpoints/0000003.pt") for r in (one, four))
    assert a["data"] == b["data"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6, msg=k)
    assert not states_equal(a["model"], safe_load(one / "checkpoints/0000003.pt")["ema"])  # weights moved
    ra, rb = rundir.read_metrics(one), rundir.read_metrics(four)
    for x, y in zip(ra, rb):
        for key in ("loss", "repa", "total", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-4), key
    with pytest.raises(ValueError, match="not divisible by the 1 process"):
        train(cfg_for(tmp_path, "train.grad_accum=3", name="bad"))
    with pytest.raises(ConfigError, match="train.grad_accum must be positive"):
        cfg_for(tmp_path, "train.grad_accum=0")

def _poison_loss(monkeypatch, at_call: int):
    from repa_probe.objectives import FlowMatching

    original, calls = FlowMatching.loss, {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        out = original(self, *args, **kwargs)
        return {k: v * float("nan") for k, v in out.items()} if calls["n"] == at_call else out

    monkeypatch.setattr(FlowMatching, "loss", poisoned)


def test_nan_loss_stops_at_the_next_check_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    _poison_loss(monkeypatch, at_call=3)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 3 \(checked steps 3-4"):
        train(cfg_for(tmp_path, "train.steps=6", "train.ckpt_every=2", name="nan"))
    assert [s for s, _ in rundir.list_checkpoints(tmp_path / "nan/checkpoints")] == [2]


def test_nan_is_checked_every_log_every_steps_not_every_step(tmp_path, monkeypatch, capsys):
    """NaN at step 2, log_every=4: the run goes on to step 4 (no per-step read), then stops with one line that
    names the step and the range checked, before logging or saving anything."""
    _poison_loss(monkeypatch, at_call=2)
    rc = None
    with pytest.raises(SystemExit) as exc:
        rc = train_main([f"run.out_dir={tmp_path}", "run.name=nan4", *FAST, "train.log_every=4",
                         "train.ckpt_every=100", "train.steps=8"])
    assert rc is None and exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "non-finite loss at step 2 (checked steps 1-4" in err[0]
    err = err[0]
    assert "train.log_every=4" in err and "last good checkpoint" in err
    assert rundir.list_checkpoints(tmp_path / "nan4/checkpoints") == [] and rundir.read_metrics(tmp_path / "nan4") == []


def _image_folder(root: Path, per_class: int = 16) -> Path:
    """Two classes of small RGB images, each a left-to-right ramp (a flip changes it)."""
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            img = (np.linspace(0, 255, 40)[None, :, None] * rng.uniform(0.3, 1, (1, 1, 3))).astype(np.uint8)
            Image.fromarray(np.broadcast_to(img, (36, 40, 3)).copy()).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.mark.slow
def test_resume_is_exact_with_flips_and_workers_on_an_image_folder(tmp_path):
    """data.flip=true, data.num_workers=2 (the paper configs' data path): 6 steps == 3 + resume + 3, bit for bit,
    across epochs (32 images, batch 16: 2 steps per epoch)."""
    root = _image_folder(tmp_path / "images")
    common = [f"data.root={root}", "data.name=imagefolder", "data.num_samples=null", "data.flip=true",
              "data.num_workers=2", "train.ckpt_every=3", "train.keep_last=5"]
    train(cfg_for(tmp_path, "train.steps=6", *common, name="straight"))
    train(cfg_for(tmp_path, "train.steps=3", *common, name="split"))
    train(cfg_for(tmp_path, "train.steps=6", *common, name="split"))
    a, b = (safe_load(tmp_path / f"{n}/checkpoints/0000006.pt") for n in ("straight", "split"))
    assert states_equal(a["model"], b["model"]) and states_equal(a["ema"], b["ema"]) and a["data"] == b["data"]


def test_state_dict_round_trip_and_format_check(tmp_path):
    s = TrainState.build(cfg_for(tmp_path), DistInfo(), torch.device("cpu"))
    train_step(s)
    path, removed = rundir.save_checkpoint(tmp_path / "ck", s.step, s.state_dict(), keep_last=1, keep_every=0)
    state = load_training_checkpoint(path)
    assert path.name == "0000001.pt" and removed == []
    assert state["format"] == "repa-probe/1" and state["step"] == 1 and state["model_config"] == s.model.config
    other = TrainState.build(cfg_for(tmp_path), DistInfo(), torch.device("cpu"))
    other.load_state_dict(state)
    train_step(s), train_step(other)
    assert other.step == 2 and states_equal(s.model.state_dict(), other.model.state_dict())
    with pytest.raises(CheckpointError, match="not a repa-probe training checkpoint"):
        other.load_state_dict({**state, "format": "other/1"})


def test_signal_saves_and_stops(tmp_path, monkeypatch):
    from repa_probe.objectives import FlowMatching

    original = FlowMatching.loss
    calls = {"n": 0}

    def signalling(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FlowMatching, "loss", signalling)
    train(cfg_for(tmp_path, "train.steps=50", "train.ckpt_every=100", name="sig"))
    assert [s for s, _ in rundir.list_checkpoints(tmp_path / "sig/checkpoints")] == [3]


def test_corrupt_latest_checkpoint_falls_back_loudly(tmp_path, caplog):
    train(cfg_for(tmp_path, "train.steps=4", "train.ckpt_every=2", name="c"))
    latest = tmp_path / "c/checkpoints/0000004.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    caplog.set_level("WARNING", logger="repa_probe")
    train(cfg_for(tmp_path, "train.steps=6", "train.ckpt_every=2", name="c"))
    assert "0000004.pt cannot be loaded" in caplog.text
    assert safe_load(tmp_path / "c/checkpoints/0000006.pt")["step"] == 6


def test_keep_last_and_keep_every(tmp_path):
    train(cfg_for(tmp_path, "train.steps=8", "train.ckpt_every=1", "train.keep_last=2", "train.keep_every=4",
                  "train.log_every=8", name="keep"))
    assert [s for s, _ in rundir.list_checkpoints(tmp_path / "keep/checkpoints")] == [4, 7, 8]
