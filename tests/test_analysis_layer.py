"""The analysis layer: options from flags, the one resolver (ours + official files), the run skeleton."""
import json

import pytest
import torch

from analysis.alignment import build_parser as alignment_parser
from analysis.probe import build_parser as probe_parser
from repa_probe.analysis.errors import AnalysisInputError, OptionsError
from repa_probe.analysis.core import inputs
from repa_probe.analysis.core.inputs import (check_times_and_layers, load_checkpoints, resolve_encoder,
                                        resolve_source)
from repa_probe.analysis.core.options import AlignmentOptions, AnalysisOptions, ProbeOptions
from repa_probe.analysis.core.runner import Analysis, run_analysis
from repa_probe.models import create_model
from repa_probe.objectives import FlowMatching
from repa_probe.timesteps import Step

TINY = dict(depth=4, hidden_size=128, num_heads=2, input_size=32, in_channels=3, num_classes=4,
            class_dropout_prob=0.1, encoder_depth=2, projector_dim=32, z_dims=(16,))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """One checkpoint of ours (with the tiny training config) and a plain official-style REPA state dict."""
    from repa_probe.training.config import load_config, to_dict

    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    ours = create_model("SiT-S/4", **TINY)
    torch.save({"format": "repa-probe/1", "model": ours.state_dict(), "ema": ours.state_dict(),
                "model_config": ours.config, "step": 5, "config": to_dict(load_config(None, []))}, d / "ours.pt")
    official = create_model("SiT-S/4", **{**TINY, "encoder_depth": 3})
    torch.save({f"module.{k}": v for k, v in official.state_dict().items()}, d / "last.pt")
    return d / "ours.pt", d / "last.pt"


# ------------------------------------------------------------------------------------------- options
def test_options_from_cli_flags():
    args = alignment_parser().parse_args(["--ckpt", "x.pt", "--out", "o", "--timesteps", "0,0.5,step:250",
                                          "--layers", "4,1", "--family", "SiT", "--encoder-depth", "4",
                                          "--metric", "cknna,cka", "--batch-size", "8"])
    opts = AlignmentOptions.from_namespace(args, progress=False)
    assert opts.timesteps == [0.0, 0.5, Step(250)] and opts.layers == [1, 4]
    assert (opts.time_convention, opts.encoder_depth, opts.metric, opts.batch_size) == ("sit", 4, ["cknna", "cka"], 8)
    assert opts.plot_timestep == 0.5 and opts.progress is False
    assert opts.to_dict()["timesteps"] == [0.0, 0.5, "step:250"]
    assert AlignmentOptions.from_dict(json.loads(json.dumps(opts.to_dict()))) == opts  # options.json round trip
    args = probe_parser("segmentation").parse_args(["--ckpt", "x.pt", "--out", "o", "--time-convention", "ddpm"])
    popts = ProbeOptions.from_namespace(args, task="segmentation")
    assert popts.timesteps == [0.0, 0.25, 0.5] and popts.time_convention == "ddpm" and popts.prefix == "segment"


@pytest.mark.parametrize("cls,kw,match", [
    (AlignmentOptions, dict(batch_size=0), "--batch-size must be an integer >= 1"),
    (AlignmentOptions, dict(timesteps="0,2"), "ambiguous: write step:2 for DDPM step 2 or 0.002"),
    (AlignmentOptions, dict(layers="1,x"), "--layers must be 'all'"),
    (AlignmentOptions, dict(metric="ssim"), "--metric: unknown metric"),
    (AlignmentOptions, dict(weights="best"), "--weights must be one of auto, ema, model"),
    (AlignmentOptions, dict(time_convention="edm"), "--time-convention"),
    (AlignmentOptions, dict(plot_timestep=0.3), "--plot-timestep 0.3 is not one of --timesteps"),
    (AlignmentOptions, dict(random_encoder=True), "--random-encoder needs --encoder"),
    (ProbeOptions, dict(labels="true"), "--labels must be null for probes"),
    (ProbeOptions, dict(max_feature_gb=0), "--max-feature-gb"),
    (ProbeOptions, dict(task="depth"), "--task must be one of linear, segmentation"),
])
def test_invalid_options_are_one_line_errors_naming_the_flag(cls, kw, match):
    with pytest.raises(OptionsError) as info:
        cls(**kw)
    assert match in str(info.value) and "\n" not in str(info.value)


def test_unknown_options_are_refused():
    with pytest.raises(OptionsError, match="unknown option.*timestep.*valid:"):
        AlignmentOptions.from_dict({"timestep": "0.5"})
    with pytest.raises(OptionsError, match="unknown option.*topk"):
        ProbeOptions.from_dict({"topk": 5})  # an alignment option is not a probe option


# ------------------------------------------------------------------------------------------ resolver
def test_resolver_on_ours_and_an_official_state_dict(ckpts):
    ours_path, official_path = ckpts
    opts = AnalysisOptions(encoder_depth=2, progress=False)
    both = load_checkpoints([ours_path, official_path], AnalysisOptions(encoder_depth=3))
    assert [e.info.config["encoder_depth"] for e in both] == [2, 3]  # ours keeps its stored depth
    ours, official = load_checkpoints([ours_path, official_path], opts)
    assert (ours.cfg is not None, official.cfg) == (True, None)
    assert official.info.config["encoder_depth"] == 2 and official.info.time_convention == "repa"
    assert isinstance(official.objective, FlowMatching) and repr(ours.objective).startswith("FlowMatching")
    # ours alone: everything from the training config
    src = resolve_source([ours], opts)
    assert (src.name, src.resolution, src.classes, src.vae, src.from_config) == ("shapes", 32, None, None, True)
    assert resolve_encoder([ours], opts, src.resolution).name == "tiny_vit"
    # an official file stores no config: --data (and --encoder where needed) are required
    with pytest.raises(AnalysisInputError, match="pass --data and --encoder"):
        resolve_source([ours, official], opts, need_encoder=True)
    with_data = opts.replace(data="shapes", encoder="tiny_vit", random_encoder=True)
    src = resolve_source([ours, official], with_data, need_encoder=True)
    assert (src.name, src.resolution, src.from_config) == ("shapes", 32, False)
    assert resolve_encoder([official], with_data, 32).name == "tiny_vit"
    with_vae = with_data.replace(vae="random:tiny")  # the VAE is resolved with the checkpoints
    (official_vae,) = load_checkpoints([official_path], with_vae)
    assert (official_vae.vae_name, official_vae.downsample_factor, official_vae.resolution) == ("random:tiny", 8, 256)
    with pytest.raises(AnalysisInputError, match="model takes 3x32"):
        resolve_source([official_vae], with_vae)
    assert check_times_and_layers([ours, official], opts.replace(layers="1,4")) == \
        {ours.label: [1, 4], official.label: [1, 4]}
    with pytest.raises(AnalysisInputError, match="last: .*float time"):
        check_times_and_layers([official], opts.replace(timesteps="step:10"))


def test_time_convention_option_applies_where_the_file_cannot_tell(ckpts, tmp_path):
    """A plain official SiT state dict looks like DiT's (2C output, no projectors): --family SiT makes it
    ``sit``; the REPA state dict beside it (projectors) and our checkpoint keep the convention they show."""
    ours_path, repa_path = ckpts
    sit_path = tmp_path / "SiT-S-4.pt"
    torch.save(create_model("DiT-S/4", **{**TINY, "z_dims": ()}).state_dict(), sit_path)
    entries = load_checkpoints([sit_path, repa_path, ours_path], AnalysisOptions(time_convention="SiT"))
    assert [e.info.time_convention for e in entries] == ["sit", "repa", "repa"]
    assert isinstance(entries[0].objective, FlowMatching) and entries[0].take_model().time_convention == "sit"
    assert load_checkpoints([sit_path], AnalysisOptions())[0].info.time_convention == "ddpm"


# ------------------------------------------------------------------------------------------ skeleton
class Counting(Analysis):
    name, columns = "counting", ("checkpoint", "step", "metric", "value")

    def setup(self, run):
        self.source = resolve_source(run.entries, run.options)

    def prepare(self, run):
        return [dict(checkpoint="reference", step=None, metric="depth", value=0)]

    def analyse(self, run, entry, model):
        assert model.training is False and next(model.parameters()).device == run.device
        return [dict(checkpoint=entry.label, step=entry.info.step, metric="depth", value=model.depth)]

    def figures(self, run, rows):
        path = run.out / "figures" / "x.png"
        path.write_bytes(b"\x89PNG")
        return [path]

    def summary(self, run, rows):
        return {"data": self.source.name}


def test_run_skeleton_loads_each_checkpoint_once_and_writes_its_files(ckpts, tmp_path, monkeypatch):
    calls = []
    real = inputs.load_model
    monkeypatch.setattr(inputs, "load_model", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    opts = AnalysisOptions(data="shapes", device="cpu", progress=False)
    summary = run_analysis(Counting(), list(ckpts), tmp_path / "out", opts)
    assert len(calls) == 2  # small models are kept from validation: each file is read once
    out = tmp_path / "out"
    lines = (out / "counting.csv").read_text().splitlines()
    assert lines == ["checkpoint,step,metric,value", "reference,,depth,0", "ours,5,depth,4", "last,,depth,4"]
    assert json.loads((out / "options.json").read_text()) == opts.to_dict() == summary["options"]
    written = json.loads((out / "summary.json").read_text())
    assert written["data"] == "shapes" and written["files"] == {"csv": "counting.csv", "options": "options.json",
                                                               "report": "report.md", "replicates": None,
                                                               "figures": ["figures/x.png"]}
    assert "| ours | 5 | depth | 4 |" in (out / "report.md").read_text()  # headline table of any analysis
    assert [c["label"] for c in written["checkpoints"]] == ["ours", "last"]
    assert written["checkpoints"][1]["time_convention"] == "repa" and written["versions"]["torch"]


def test_run_skeleton_under_torchrun_writes_on_rank_0_only(ckpts, tmp_path, monkeypatch):
    """Every rank runs the hooks (sampling is sharded); a rank > 0 writes no file and returns files=None."""
    from repa_probe.analysis.core import runner
    from repa_probe.training.distributed import DistInfo

    monkeypatch.setattr(runner, "init_distributed", lambda device_type: DistInfo(rank=1, world_size=2))
    monkeypatch.setattr(runner, "cleanup_distributed", lambda: None)
    seen = []
    analysis = Counting()
    analysis.analyse = lambda run, entry, model: seen.append(run.dist.rank) or []
    summary = run_analysis(analysis, list(ckpts), tmp_path / "out", AnalysisOptions(data="shapes", device="cpu"))
    assert summary["files"] is None and seen == [1, 1] and not (tmp_path / "out").exists()


def test_run_skeleton_fails_before_writing_anything(ckpts, tmp_path):
    with pytest.raises(AnalysisInputError, match="pass --data"):
        run_analysis(Counting(), [ckpts[1]], tmp_path / "out", AnalysisOptions(progress=False))
    assert not (tmp_path / "out").exists()


def test_alignment_of_a_dit_file_at_an_explicit_step(tmp_path):
    """DDPM steps flow through to the table and the figures as the user wrote them (``step:500``)."""
    from repa_probe.analysis.alignment.run import run_alignment

    path = tmp_path / "DiT-S-4.pt"
    torch.save(create_model("DiT-S/4", **{**TINY, "z_dims": ()}).state_dict(), path)
    opts = AlignmentOptions(data="shapes", encoder="tiny_vit", random_encoder=True, num_samples=16, layers="1,2",
                            timesteps="0,step:500", topk=3, batch_size=8, device="cpu", progress=False)
    summary = run_alignment([path], tmp_path / "out", opts)
    lines = (tmp_path / "out" / "alignment.csv").read_text().splitlines()[1:]
    assert sorted(ln.split(",")[3] for ln in lines) == ["0.0", "0.0", "step:500", "step:500"]
    assert summary["checkpoints"][0]["time_convention"] == "ddpm" and summary["settings"]["plot_timestep"] == "step:500"
    assert any(p.endswith("layers_tstep500_cknna.png") for p in summary["files"]["figures"]), summary["files"]


def test_paths_expand_files_folders_and_patterns_and_refuse_the_rest(tmp_path):
    from repa_probe.analysis.core.paths import expand_paths

    (tmp_path / "d").mkdir()
    (tmp_path / "empty").mkdir()
    for name in ("a.csv", "d/b.csv", "d/c.csv"):
        (tmp_path / name).write_text("x")
    finder = lambda d: sorted(d.glob("*.csv"))  # noqa: E731
    got = expand_paths([tmp_path / "a.csv", tmp_path / "d"], "--tables", finder, "tables")
    assert [p.name for p in got] == ["a.csv", "b.csv", "c.csv"]
    got = expand_paths([str(tmp_path / "d" / "*.csv")], "--tables", finder, "tables", patterns=True)
    assert [p.name for p in got] == ["b.csv", "c.csv"]
    for items, match in [([tmp_path / "empty"], "directory has no tables"), ([tmp_path / "nope"], "no such file"),
                         ([str(tmp_path / "*.npz")], "no such file"), ([], "nothing given")]:
        with pytest.raises(AnalysisInputError, match=match):
            expand_paths(items, "--tables", finder, "tables")
    with pytest.raises(AnalysisInputError, match="the pattern matches nothing"):
        expand_paths([str(tmp_path / "*.npz")], "--tables", finder, "tables", patterns=True)
