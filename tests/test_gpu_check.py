"""bench/gpu_check.sh, the prepared device check, runs on CPU at tiny sizes so that it cannot rot."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
SECTIONS = (
    "## Machine",
    "## MSAD: batched vs per-position loop",
    "## embed throughput",
    "## embed_scene throughput",
    "## Training step with and without MSAD",
    "## Training run: loss curve",
)


def section(text: str, heading: str) -> str:
    start = text.index(heading) + len(heading)
    following = text.find("\n## ", start)
    return text[start:] if following < 0 else text[start:following]


def test_tiny_cpu_run_writes_every_section_with_numbers(tmp_path: Path) -> None:
    out = tmp_path / "x.md"
    done = subprocess.run([str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    for heading in SECTIONS:
        assert heading in text
        body = section(text, heading)
        # A table row with a measured number, not just the heading and the column names.
        assert re.search(r"^\|.*\d+\.\d+.*\|$", body, re.MULTILINE) or heading == "## Machine", heading
    assert f"torch {torch.__version__}" in section(text, "## Machine")
    assert re.search(r"\| \d+\.\d+x \|", section(text, "## MSAD: batched vs per-position loop"))  # speed-up
    curve = section(text, "## Training run: loss curve")
    assert len(re.findall(r"^\| \d+ \| \d+\.\d{4} \|", curve, re.MULTILINE)) >= 2  # step -> loss rows
    assert "peak GPU memory" in text and "n/a" in text  # CPU: no GPU memory to report


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_cuda_without_cuda_exits_nonzero_with_one_line(tmp_path: Path) -> None:
    done = subprocess.run([str(SCRIPT), "--device", "cuda", "--out", str(tmp_path / "x.md")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0]
    assert not (tmp_path / "x.md").exists()
