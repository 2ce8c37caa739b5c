"""benchmarks/gpu.sh: its CPU dry run measures all four sections and appends them to the given file."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _gpu_module():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_benchmark"] = module          # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_gpu_script_dry_run_writes_every_section(tmp_path):
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu.sh")]).returncode == 0
    gpu = _gpu_module()
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n")
    text = gpu.main(["--dry-run", "--out", str(out)])
    assert out.read_text() == "# Benchmarks\n\n" + text
    for heading in ("## GPU day", "### Train step", "### Sampling", "### FID-50K", "### Alignment pass"):
        assert heading in text, heading
    assert "images/s" in text and "Speed-up: **" in text and "projected" in text


def test_generate_py_loop_is_an_euler_maruyama_sde_with_guidance_inside_the_interval():
    gpu = _gpu_module()
    calls = []

    def model(x, t, y):
        calls.append((x.shape[0], float(t[0])))
        return (torch.zeros_like(x),)

    z = torch.randn(3, 4, 2, 2)
    torch.manual_seed(0)
    x = gpu.generate_py_loop(model, z, torch.zeros(3, dtype=torch.long), steps=5, cfg=1.8, high=0.7)
    # t = 1, 0.76 (unguided, batch 3), 0.52, 0.28, 0.04 (guided, batch 6); last step mean-only
    assert [b for b, _ in calls] == [3, 3, 6, 6, 6] and x.dtype == torch.float64
    assert abs(calls[1][1] - 0.76) < 1e-6
