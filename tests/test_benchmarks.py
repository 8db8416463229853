"""The benchmark scripts run end to end on CPU with tiny shapes (their figures are not checked here)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_with_a_tiny_config(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--dir", str(tmp_path / "ck"),
                    "--out", str(tmp_path / "gpu.md")], check=True, capture_output=True, timeout=600)
    text = (tmp_path / "gpu.md").read_text()
    for row in ("from_pretrained time", "train step nara, checkpointing=True", "recipe update 32 = 1 x 32"):
        assert row in text


def test_ratio_benchmarks_run_quickly(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path / "b.md")],
                   check=True, capture_output=True, timeout=600)
    text = (tmp_path / "b.md").read_text()
    for section in ("## Adapted layer", "## Training step", "## Sampling step", "## Early termination", "## Size at LLaDA-8B",
                    "| nara | 34,227,968 | 0.4252 |", "NaRA / LoRA per training step"):
        assert section in text
