"""REPA-E end to end (vae.tune=true): stop-gradient, the frozen model in the VAE update, the BatchNorm across
processes, exact resume (also after kill -9), NaN in each of the three losses, LPIPS weights, the tiny run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from repa_probe.checkpoint import load_model, safe_load
from repa_probe.encoders.vae_losses import LPIPSWeightsError, load_lpips
from repa_probe.models.latent_norm import LatentBatchNorm
from repa_probe.training import e2e
from repa_probe.training.builders import model_inputs
from repa_probe.training.config import load_config
from repa_probe.training.distributed import DistInfo
from repa_probe.training.trainer import TrainState, train
from train.cli import main as train_main

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "configs" / "repae_tiny.yaml"
SMALL = ["data.num_samples=32", "train.batch_size=8", "model.depth=2", "model.hidden_size=32", "model.num_heads=2",
         "repa.projector_dim=32", "repa.encoder_depth=1", "vae_loss.disc_channels=8", "train.tensorboard=false",
         "train.log_every=2"]


def cfg_for(tmp_path, *extra, name="r"):
    return load_config(str(CFG), [f"run.out_dir={tmp_path}", f"run.name={name}", *SMALL, *extra])


def _state_and_inputs(tmp_path, *extra):
    cfg = cfg_for(tmp_path, *extra)
    s = TrainState.build(cfg, DistInfo(), torch.device("cpu"))
    x, z_enc, y = model_inputs(s.batches.next(), None, s.enc, s.device, s.gen, s.dist, cfg, s.model.grid_size)
    eps = torch.randn(x.shape[0], 4, 4, 4)
    t, noise = torch.rand(x.shape[0]), torch.randn(eps.shape)
    return s, e2e.StepInputs(x, y, y, z_enc, t, noise, eps)


def _grads_at_vae_step(s):
    """Wrap the VAE optimiser: the gradient norm it sees when it steps."""
    seen = []
    step = s.e2e.opt_vae.step

    def wrapped(*a, **k):
        seen.append(sum(float(p.grad.abs().sum()) for p in s.e2e.vae.parameters() if p.grad is not None))
        return step(*a, **k)
    s.e2e.opt_vae.step = wrapped
    return seen


def test_diffusion_loss_never_reaches_the_vae_but_the_repa_term_does(tmp_path):
    # only the REPA term trains the VAE here: its own losses are weighted 0
    off = ["vae_loss.recon_weight=0", "vae_loss.kl_weight=0", "vae_loss.disc_weight=0"]
    s, inp = _state_and_inputs(tmp_path, *off)
    seen = _grads_at_vae_step(s)
    e2e.e2e_update(s, inp)
    assert seen[0] > 0  # REPA reached the VAE
    # after the diffusion update (its backward ran last) the VAE holds no gradient at all
    assert all(p.grad is None for p in s.e2e.vae.parameters())
    s2, inp2 = _state_and_inputs(tmp_path, *off, "repa.vae_coeff=0")
    seen2 = _grads_at_vae_step(s2)
    e2e.e2e_update(s2, inp2)
    assert seen2[0] == 0.0  # nothing else reaches it: the diffusion loss is stopped at z


def test_vae_update_leaves_the_diffusion_model_and_its_statistics_untouched(tmp_path):
    s, inp = _state_and_inputs(tmp_path)
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    out = s.e2e.vae_net(inp.x, inp.eps)
    logs = e2e._vae_update(s, inp, out)
    after = s.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the VAE update moved the diffusion model"
    assert all(p.grad is None for p in s.model.parameters())
    assert s.model.training and all(p.requires_grad for p in s.params)  # restored for the diffusion update
    assert float(logs["vae_repa"]) < 0
    # the diffusion update then moves the BatchNorm statistics (batch statistics in train mode)
    e2e._diffusion_update(s, inp, out[2].detach())
    assert not torch.equal(before["bn.running_mean"], s.model.bn.running_mean)
    assert int(s.model.bn.num_batches_tracked) == 1


def _bn_worker(rank, world, port, x, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        bn = LatentBatchNorm(x.shape[1]).train()
        y = bn(x.chunk(world)[rank])
        torch.save({"y": y, "mean": bn.running_mean, "var": bn.running_var}, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_latent_batchnorm_statistics_are_global_across_two_gloo_processes(tmp_path, free_port):
    x = torch.randn(8, 4, 3, 3) * torch.tensor([1.0, 2.0, 0.5, 3.0]).reshape(1, 4, 1, 1) + 1.5
    mp.spawn(_bn_worker, args=(2, free_port, x, str(tmp_path)), nprocs=2, join=True)
    ref = LatentBatchNorm(4).train()
    y_ref = ref(x)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["y"], y_ref.chunk(2)[rank], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["mean"], ref.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["var"], ref.running_var, rtol=1e-5, atol=1e-6)


def _same_checkpoints(a, b):
    for key in ("model", "ema", "vae", "discriminator"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k}"
    for key in ("opt", "opt_vae", "opt_disc"):
        sa, sb = a[key]["state"], b[key]["state"]
        assert all(torch.equal(sa[i][n], sb[i][n]) for i in sa for n in sa[i]), key
    assert torch.equal(a["rng"]["generator"], b["rng"]["generator"]) and a["data"] == b["data"]


def test_resume_is_exact_with_three_optimisers_also_after_kill_9(tmp_path):
    common = ["train.ckpt_every=2", "train.keep_last=5"]
    train(cfg_for(tmp_path, "train.steps=4", *common, name="straight"))
    train(cfg_for(tmp_path, "train.steps=2", *common, name="split"))
    train(cfg_for(tmp_path, "train.steps=4", *common, name="split"))
    a = safe_load(tmp_path / "straight/checkpoints/0000004.pt")
    _same_checkpoints(a, safe_load(tmp_path / "split/checkpoints/0000004.pt"))
    assert {"vae", "vae_config", "discriminator", "opt_vae", "opt_disc"} <= set(a)
    # kill -9 once the first checkpoint is written, then run the same command again
    cmd = [sys.executable, "-m", "train", "--cfg", str(CFG), f"run.out_dir={tmp_path}", "run.name=killed", *SMALL,
           *common, "train.steps=400"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same float reductions as here
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "killed/checkpoints/0000002.pt"
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists()
    for p in (tmp_path / "killed/checkpoints").glob("*.pt"):
        if int(p.stem) > 2:
            p.unlink()  # keep the state right after step 2, as if killed before the next save
    train(cfg_for(tmp_path, "train.steps=4", *common, name="killed"))
    _same_checkpoints(a, safe_load(tmp_path / "killed/checkpoints/0000004.pt"))


@pytest.mark.parametrize("where, name", [("vae", "VAE loss"), ("disc", "discriminator loss"),
                                         ("diffusion", "diffusion loss")])
def test_nan_in_each_loss_stops_with_one_line_naming_it(tmp_path, monkeypatch, capsys, where, name):
    calls = {"n": 0}

    def poison(fn, key):
        """``fn`` whose third call (step 3) returns NaN in ``key`` (or as a whole)."""
        def wrapped(*a, **k):
            calls["n"] += 1
            out = fn(*a, **k)
            if calls["n"] != 3:
                return out
            return {**out, key: out[key] * float("nan")} if key else out * float("nan")
        return wrapped
    if where == "vae":
        monkeypatch.setattr(e2e, "vae_loss_terms", poison(e2e.vae_loss_terms, "vae"))
    elif where == "disc":
        monkeypatch.setattr(e2e, "hinge_d_loss", poison(e2e.hinge_d_loss, None))
    else:
        from repa_probe.objectives.flow import FlowMatching
        monkeypatch.setattr(FlowMatching, "loss", poison(FlowMatching.loss, "loss"))
    with pytest.raises(SystemExit) as exc:
        train_main(["--cfg", str(CFG), f"run.out_dir={tmp_path}", "run.name=nan", *SMALL, "train.steps=6",
                    "train.ckpt_every=2"])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"non-finite {name} at step 3" in err[0], err
    ckpts = sorted(p.name for p in (tmp_path / "nan/checkpoints").glob("*.pt"))
    assert ckpts == ["0000002.pt"]  # the last good one


def test_lpips_without_weights_is_one_line_naming_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train_main(["--cfg", str(CFG), f"run.out_dir={tmp_path}", *SMALL, "vae_loss.perceptual_weight=1"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(err) == 1 and "vae_loss.lpips_weights=" in err[0]
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lins, tmp_path / "vgg.pth")
    with pytest.raises(LPIPSWeightsError, match="vae_loss.vgg_weights="):
        load_lpips(str(tmp_path / "vgg.pth"), str(tmp_path / "missing.pth"))


def test_lpips_loads_its_weights_and_measures_distances(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    torch.save(make_layers(cfgs["D"]).state_dict(), tmp_path / "features.pth")
    vgg = {f"features.{k}": v for k, v in torch.load(tmp_path / "features.pth", weights_only=True).items()}
    torch.save(vgg, tmp_path / "vgg16.pth")
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lins, tmp_path / "lin.pth")
    lp = load_lpips(str(tmp_path / "lin.pth"), str(tmp_path / "vgg16.pth"))
    assert torch.equal(lp.net.slice1[0].weight, vgg["features.0.weight"]) and torch.equal(lp.lin4.model[1].weight,
                                                                                          lins["lin4.model.1.weight"])
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert float(lp(a, a).abs().max()) == 0.0 and bool((lp(a, b) > 0).all())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same short REPA-E run with the REPA term into the VAE (repa.vae_coeff=1.5) and without (0)."""
    root = tmp_path_factory.mktemp("repae_runs")
    return {c: train(cfg_for(root, f"repa.vae_coeff={c}", "train.steps=8", "train.log_every=8", "train.ckpt_every=8",
                             name=f"c{c}")) for c in (1.5, 0)}


def test_tiny_repae_run_tunes_the_vae_and_lowers_its_repa_loss(runs, tmp_path):
    from repa_probe.training import rundir

    vae_repa = {c: rundir.read_metrics(r)[-1]["vae_repa"] for c, r in runs.items()}
    assert vae_repa[1.5] < vae_repa[0], vae_repa
    ckpt = safe_load(runs[1.5] / "checkpoints/0000008.pt")
    fresh = TrainState.build(cfg_for(tmp_path, name="fresh"), DistInfo(), torch.device("cpu")).e2e.vae.state_dict()
    assert any(not torch.equal(fresh[k], ckpt["vae"][k]) for k in fresh)
    model, info = load_model(runs[1.5] / "checkpoints/0000008.pt")
    assert model.bn is not None and not model.bn.training and info.step == 8


def test_export_vae_folder_opens_everywhere_and_feeds_the_second_stage(runs, tmp_path):
    from diffusers import AutoencoderKL

    from repa_probe.encoders.vae import load_vae
    from repa_probe.trained_vae import load_checkpoint_vae
    from train.export_vae import main as export_main
    from train.extract_latents import main as extract_main

    out = tmp_path / "e2e-vae"
    assert export_main(["--ckpt", str(runs[1.5]), "--out", str(out)]) == 0
    assert isinstance(AutoencoderKL.from_pretrained(out), AutoencoderKL)  # diffusers itself
    exported, tuned = load_vae(out), load_checkpoint_vae(runs[1.5])
    ema = safe_load(runs[1.5] / "checkpoints/0000008.pt")["ema"]
    torch.testing.assert_close(exported.latent_stats()["latents_scale"].flatten(), ema["bn.running_var"].rsqrt())
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(exported.encode_moments(images), tuned.encode_moments(images))
    raw = torch.randn(2, 4, 4, 4)
    bn = load_model(runs[1.5] / "checkpoints/0000008.pt")[0].bn
    torch.testing.assert_close(tuned.normalize(raw), bn(raw))  # the model's BatchNorm in eval mode
    torch.testing.assert_close(tuned.denormalize(tuned.normalize(raw)), raw, rtol=1e-3, atol=1e-3)
    # second stage: extract the tuned latents (from the run itself), train plain REPA on them
    data = tmp_path / "latents"
    assert extract_main(["--data", "shapes", "--resolution", "32", "--num-samples", "16", "--vae", str(runs[1.5]),
                         "--out", str(data), "--num-workers", "0"]) == 0
    stage2 = load_config(None, [f"run.out_dir={tmp_path}", "run.name=stage2", "data.name=repa", f"data.root={data}",
                                f"vae.name={out}", "model.name=SiT-S/1", *SMALL[1:], "data.num_samples=16",
                                "train.steps=2"])
    ckpt = safe_load(train(stage2) / "checkpoints/0000002.pt")
    assert "vae" not in ckpt and ckpt["model_config"]["in_channels"] == 4


def test_shipped_repae_configs_are_the_recipe_and_the_tiny_run():
    cfg = load_config(str(ROOT / "configs/repae_sit.yaml"))
    assert (cfg.model.name, cfg.repa.encoder_depth, cfg.repa.proj_coeff, cfg.repa.vae_coeff) == (
        "SiT-XL/2", 8, 0.5, 1.5)
    assert (cfg.train.steps, cfg.train.batch_size, cfg.optim.lr, cfg.vae.lr, cfg.vae_loss.disc_lr) == (
        400_000, 256, 1e-4, 1e-4, 1e-4)
    assert (cfg.vae.tune, cfg.vae.latent_norm, cfg.vae.bn_momentum, cfg.encoder.name) == (
        True, "batchnorm", 0.1, "dinov2_vitb14")
    assert (cfg.vae_loss.perceptual_weight, cfg.vae_loss.kl_weight, cfg.vae_loss.disc_weight) == (1.0, 1e-6, 0.1)
    tiny = load_config(str(CFG))
    assert tiny.vae_loss.perceptual_weight == 0 and tiny.vae.tune and tiny.model.name == "SiT-S/1"
    with pytest.raises(Exception, match="vae.latent_norm=batchnorm"):
        load_config(str(CFG), ["vae.latent_norm=fixed"])


def test_analyses_read_each_checkpoints_tuned_vae_and_the_latent_layer(runs, tmp_path):
    """Alignment with --layers latent on a REPA-E run: each checkpoint's entry reads latents with its tuned VAE
    normalised by its EMA BatchNorm; layer 0 (the clean latent tokens) is the same at every t; sampling decodes
    with the same statistics; --vae names the exported folder instead (normalised by the checkpoint)."""
    import csv

    from analysis.alignment import main as align_main
    from analysis.sample import main as sample_main
    from repa_probe.analysis.core.inputs import load_checkpoints
    from repa_probe.analysis.core.options import AnalysisOptions
    from repa_probe.trained_vae import export_vae

    ckpt = runs[1.5] / "checkpoints/0000008.pt"
    entry = load_checkpoints([ckpt], AnalysisOptions(weights="ema"))[0]
    bn = load_model(ckpt)[0].bn
    raw = torch.randn(3, 4, 4, 4)
    torch.testing.assert_close(entry.vae.normalize(raw), bn(raw))
    vae_sd = safe_load(ckpt)["vae"]
    assert all(torch.equal(v, vae_sd[k]) for k, v in entry.vae.vae.state_dict().items())  # the tuned VAE
    out = tmp_path / "align"
    assert align_main(["--ckpt", str(ckpt), "--out", str(out), "--num-samples", "24", "--timesteps", "0,1",
                       "--layers", "latent,1", "--topk", "5", "--bootstrap", "0", "-q"]) == 0
    rows = list(csv.DictReader(open(out / "alignment.csv")))
    latent = {r["timestep"]: float(r["value"]) for r in rows if r["layer"] == "0"}
    assert len(latent) == 2 and len(set(latent.values())) == 1 and {r["layer"] for r in rows} == {"0", "1"}
    exported = export_vae(ckpt, tmp_path / "e2e-vae")
    entry2 = load_checkpoints([ckpt], AnalysisOptions(weights="ema", vae=str(exported)))[0]
    torch.testing.assert_close(entry2.vae.normalize(raw), bn(raw))
    samples = tmp_path / "samples"
    assert sample_main(["--ckpt", str(ckpt), "--out", str(samples), "--num-samples", "2", "--steps", "2",
                        "--batch-size", "2", "--quiet"]) == 0
    pngs = list(samples.rglob("*.png"))
    assert pngs and all(p.stat().st_size > 0 for p in pngs)
