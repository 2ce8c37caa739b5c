"""One owner for what a checkpoint needs: run label, VAE default, latent channels / factor, resolution."""
import json
import types

import pytest

from repa_probe.encoders.vae import VAEWeightsError, default_vae
from repa_probe.training.builders import latent_shape
from repa_probe.training.config import ConfigError, load_config
from repa_probe.training.rundir import checkpoint_label, checkpoint_run


def test_checkpoint_label_and_run_are_built_once():
    assert (checkpoint_label("runs/tiny/checkpoints/0000200.pt"), checkpoint_run("runs/tiny/checkpoints/0000200.pt")) \
        == ("tiny/0000200", "tiny")
    assert (checkpoint_label("/x/SiT-XL-2-256.pt"), checkpoint_run("/x/SiT-XL-2-256.pt")) == ("SiT-XL-2-256", None)


def test_latent_shape_reads_the_vae_not_constants():
    """A 32-channel, factor-16 VAE (REPA-E / VA-VAE) gives 32 x res/16 inputs; pixels 3 x res."""
    cfg = load_config(None, ["data.resolution=256"])
    vavae = types.SimpleNamespace(latent_channels=32, downsample_factor=16, name="va-vae")
    assert latent_shape(cfg, vavae) == (32, 16)
    assert latent_shape(cfg, None) == (3, 256)
    with pytest.raises(ConfigError, match="multiple of 16 for vae.name=va-vae"):
        latent_shape(load_config(None, ["data.resolution=264"]), vavae)


def test_default_vae_by_latent_channels():
    assert default_vae(3) == "none" and default_vae(4) == "stabilityai/sd-vae-ft-ema"
    with pytest.raises(VAEWeightsError, match="32-channel latents .* pass --vae"):
        default_vae(32)


def test_correlate_takes_the_run_from_the_summary_not_the_label(tmp_path):
    """The run of a row comes from summary.json (what the resolver recorded), never from splitting the label."""
    from repa_probe.analysis.correlation.correlate import load_tables

    folder = tmp_path / "align"
    folder.mkdir()
    (folder / "alignment.csv").write_text("checkpoint,step,layer,timestep,metric,value\n"
                                          "a/0000001,1,1,0.5,cknna,0.1\nb,2,1,0.5,cknna,0.2\n")
    (folder / "summary.json").write_text(json.dumps({"checkpoints": [dict(label="a/0000001", run="long/run"),
                                                                     dict(label="b", run=None)]}))
    df = load_tables([folder])
    assert df["run"].tolist() == ["long/run", "b"]  # a file outside a run is a run of its own
