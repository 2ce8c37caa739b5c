"""The analyses on a REG run: the class token its blocks need, its own class-token rows, probes, sampling."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from repa_probe.analysis.alignment.run import AlignmentOptions, run_alignment
from repa_probe.analysis.core.features import CaptureSettings, extract_features, prepare_inputs
from repa_probe.analysis.core.options import ProbeOptions
from repa_probe.analysis.errors import AnalysisInputError
from repa_probe.analysis.generation.generate import Running, SamplerSettings, generate
from repa_probe.analysis.probes.run import run_probes
from repa_probe.checkpoint import load_model
from repa_probe.data import build_dataset
from repa_probe.objectives import FlowMatching
from repa_probe.sampling.noise import CLASS_TOKEN_KEY, seeded_noise
from repa_probe.training.builders import build_encoder
from repa_probe.training.config import load_config

OVERRIDES = ["reg.cls_coeff=0.03", "train.steps=2", "train.ckpt_every=2", "train.log_every=1", "data.num_samples=32",
             "train.batch_size=8", "train.tensorboard=false", "model.depth=2", "model.hidden_size=32",
             "model.num_heads=2", "repa.projector_dim=32", "repa.encoder_depth=1"]


@pytest.fixture(scope="module")
def reg_run(tmp_path_factory):
    from repa_probe.training.trainer import train

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, [f"run.out_dir={out}", "run.name=reg", *OVERRIDES])
    return Path(train(cfg)), cfg


def test_features_take_the_noised_class_token_and_pool_patch_tokens_only(reg_run):
    run, cfg = reg_run
    model, _ = load_model(run / "checkpoints" / "0000002.pt")
    data = build_dataset("shapes", resolution=32, num_samples=6, seed=0)
    inputs = prepare_inputs(data, progress=False)
    with pytest.raises(AnalysisInputError, match="class tokens"):
        extract_features(model, FlowMatching(), inputs, [0.5], settings=CaptureSettings(progress=False))
    enc = build_encoder(cfg, torch.device("cpu"))
    inputs.cls = torch.stack([enc.cls(data[i]["image"][None])[0] for i in range(len(data))])
    fs = extract_features(model, FlowMatching(), inputs, [0.5], layers=[1, 2],
                          settings=CaptureSettings(seed=3, progress=False))
    x0 = inputs.x0(0, 6, "cpu")
    t = torch.full((6,), 0.5)
    x_t = FlowMatching().add_noise(x0, t, inputs.noise(0, 6, 3, "cpu"))
    cls_t = FlowMatching().add_noise(inputs.cls, t, seeded_noise(3 ^ CLASS_TOKEN_KEY, inputs.indices, (64,)))
    with torch.no_grad():
        hidden = model(x_t, t, torch.full((6,), model.num_classes), cls_token=cls_t, return_hidden=True)[-1]
    for layer in (1, 2):
        torch.testing.assert_close(fs.get(layer, 0.5), hidden[layer - 1][:, 1:].mean(1))
        torch.testing.assert_close(fs.class_token[(layer, 0.5)], hidden[layer - 1][:, 0])


def test_alignment_spatial_and_probes_run_on_a_reg_run(reg_run, tmp_path):
    run, _ = reg_run
    summary = run_alignment([run], tmp_path / "align", AlignmentOptions(
        num_samples=24, timesteps=(0.0, 0.5), metric=("cknna", "lds"), topk=4, batch_size=12, progress=False))
    rows = [r for r in _csv(tmp_path / "align" / "alignment.csv") if r["layer"] != "target"]
    metrics = {(r["metric"], r["layer"], r["timestep"]) for r in rows}
    times = {r["timestep"] for r in rows}
    assert len(times) == 2 and metrics == {(m, layer, t) for m in ("cknna", "cknna_cls", "lds") for layer in "12"
                                           for t in times}
    assert {b["metric"] for b in summary["best"]} >= {"cknna", "cknna_cls"}
    assert any("cknna_cls" in p.name for p in (tmp_path / "align" / "figures").iterdir())
    probes = run_probes([run], tmp_path / "probe", ProbeOptions(task="linear", num_train=32, num_test=16,
                                                                timesteps=(0.5,), progress=False))
    assert {r["layer"] for r in probes["rows"] if r.get("source") == "model"} == {1, 2}


def test_sampling_a_reg_model_is_seeded_per_sample(reg_run, tmp_path):
    run, _ = reg_run
    model, _ = load_model(run / "checkpoints" / "0000002.pt")
    settings = SamplerSettings(num_samples=4, method="sde", steps=3, cfg_scale=2.0, guidance_high=0.85,
                               cls_cfg_scale=1.5, labels="random")
    generate(model, tmp_path / "a", settings, running=Running(batch_size=4, progress=False))
    generate(model, tmp_path / "b", settings, running=Running(batch_size=3, progress=False))
    a, b = (np.load(tmp_path / d / "samples.npz")["arr_0"] for d in ("a", "b"))
    assert a.shape == (4, 32, 32, 3) and np.array_equal(a, b)
    assert json.loads((tmp_path / "a" / "sampling.json").read_text())["cls_cfg_scale"] == 1.5


def _csv(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))
