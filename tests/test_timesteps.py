"""repa_probe.timesteps: user time -> each convention's model input and back, the step:N syntax, old configs."""
import pytest
import torch

from repa_probe.checkpoint import load_model
from repa_probe.models import create_model
from repa_probe.objectives import FlowMatching, GaussianDiffusion
from repa_probe.timesteps import (TIME_HELP, Step, TimeError, check_objective, convention_of, label, model_times,
                                  parse_times, process_time, user_time)


def test_parse_floats_steps_and_the_two_unambiguous_integers():
    assert parse_times("0,0.5,1,1e-3, step:250") == [0.0, 0.5, 1.0, 0.001, Step(250)]
    assert parse_times([0, 1, 0.25, Step(3)]) == [0.0, 1.0, 0.25, Step(3)]
    assert parse_times(torch.tensor([0.5])) == [0.5]
    assert [label(t) for t in parse_times("0.5,step:7")] == [0.5, "step:7"]


@pytest.mark.parametrize("text,suggestion", [("2", "step:2 for DDPM step 2 or 0.002"),
                                             ("250", "step:250 for DDPM step 250 or 0.25")])
def test_bare_integers_are_ambiguous_and_the_error_suggests_both_spellings(text, suggestion):
    with pytest.raises(TimeError, match="ambiguous") as info:
        parse_times(f"0,{text}")
    assert suggestion in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(TimeError, match="ambiguous"):
        parse_times([int(text)])  # library callers too


@pytest.mark.parametrize("bad,match", [("1.5", r"\[0, 1\]"), ("-0.1", r"\[0, 1\]"), ("nan", r"\[0, 1\]"),
                                       ("abc", "not a time"), ("step:x", "not a DDPM step"), ("", "no times"),
                                       ([True], "not a time")])
def test_bad_times_are_one_line_errors(bad, match):
    with pytest.raises(TimeError, match=match):
        parse_times(bad)


def test_each_convention_maps_user_time_to_its_model_input():
    times = parse_times("0,0.25,1")
    t, net = model_times(times, "repa")
    assert net.dtype == torch.float32 and net.tolist() == [0.0, 0.25, 1.0] and torch.equal(t, net)
    t, net = model_times(times, "sit")                      # official SiT: t = 0 is noise
    assert t.tolist() == [0.0, 0.25, 1.0] and net.tolist() == [1.0, 0.75, 0.0]
    t, net = model_times(parse_times("0,0.25,0.5,1,step:250"), "ddpm")
    assert net.dtype == torch.int64 and net.tolist() == [0, round(0.25 * 999), round(0.5 * 999), 999, 250]
    assert process_time([1.0, 0.5], "ddpm", num_steps=250).tolist() == [249, 124]


def test_round_trip_user_time_to_model_and_back():
    grid = [i / 20 for i in range(21)]
    for conv in ("repa", "sit"):
        t, _ = model_times(grid, conv)
        torch.testing.assert_close(user_time(t, conv), torch.tensor(grid, dtype=torch.float64), atol=1e-7, rtol=0)
    steps = torch.arange(1000)
    back = user_time(steps, "ddpm")
    assert torch.equal(process_time(back.tolist(), "ddpm"), steps)   # every step survives the round trip


def test_steps_are_for_ddpm_models_only_and_in_range():
    with pytest.raises(TimeError, match="float time"):
        process_time([Step(250)], "repa")
    with pytest.raises(TimeError, match="0..999"):
        process_time([Step(1000)], "ddpm")
    with pytest.raises(TimeError, match="time convention"):
        process_time([0.5], "edm")


def test_objective_must_fit_the_convention():
    check_objective("sit", FlowMatching())
    check_objective("ddpm", GaussianDiffusion(1000))
    with pytest.raises(TimeError, match="GaussianDiffusion"):
        check_objective("ddpm", FlowMatching())
    with pytest.raises(TimeError):
        check_objective("repa", GaussianDiffusion(1000))
    assert FlowMatching().model_time(torch.tensor([0.3])).item() == pytest.approx(0.3)


def test_family_names_and_help_text():
    assert [convention_of(f) for f in ("REPA", "SiT", "DiT", "sit")] == ["repa", "sit", "ddpm", "sit"]
    with pytest.raises(TimeError):
        convention_of("EDM")
    assert "t = 0 is clean data, t = 1 is pure noise" in TIME_HELP and "step:N" in TIME_HELP


def test_old_checkpoints_storing_family_still_load(tmp_path):
    """Our checkpoints written before ``time_convention`` store ``family`` in model_config."""
    model = create_model("DiT-S/2", depth=2, input_size=8, hidden_size=64, num_heads=4)
    config = model.config
    config["family"] = {"ddpm": "DiT"}[config.pop("time_convention")]
    path = tmp_path / "old.pt"
    torch.save({"format": "repa-probe/1", "model": model.state_dict(), "ema": model.state_dict(),
                "model_config": config, "step": 3, "config": {}}, path)
    loaded, info = load_model(path)
    assert info.time_convention == "ddpm" and loaded.config["time_convention"] == "ddpm"
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
