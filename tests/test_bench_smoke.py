"""The benchmark harness end to end in its tiny smoke mode (checks outputs, never timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke_writes_json_markdown_and_png(tmp_path):
    out = tmp_path / "res"
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--threads", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "results.json").read_text())
    (result,) = data["results"]
    assert result["status"] == "ok", result.get("reason")
    assert result["spec"]["contestant"] == "gptlab" and result["unit"] == "tok/s"
    assert len(result["values"]) == 1 and result["values"][0] > 0
    assert result["peak_rss_mb"] > 50  # a child running torch: real ru_maxrss, not a placeholder
    limits = data["limits"]
    assert limits["matmul_gflops_float32"] > 0 and limits["read_gbs"] > 0
    row = data["rows"][0]
    assert 0 < row["fraction"] < 1  # a training MFU must be a fraction of the measured peak
    md = (out / "results.md").read_text()
    assert "| job | dtype | gptlab | transformers | llms-from-scratch |" in md
    assert "smoke: train a tiny model" in md and "Machine limits" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_unknown_job(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "--jobs", "nope", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown job(s) nope" in proc.stderr
