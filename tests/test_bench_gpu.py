"""cluster/bench-gpu.sh, dry-run end to end on the CPU at tiny settings: the script a GPU slot runs must
work before the slot starts (issue 30: it called a bare `factory`, needed 25-40 minutes, and left MFU empty
on every row but one)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(out: Path, **env) -> subprocess.CompletedProcess:
    tiny = {
        "SETUP": "none",
        "FACTORY": f"{sys.executable} -m factory.cli",
        "DEVICE": "cpu",
        "DTYPE": "fp32",
        "MODELS": "toyworld",
        "RESOLUTION": "64",
        "BATCHES": "1 2",
        "STEPS": "2",
        "REPEATS": "1",
    }
    return subprocess.run(
        ["bash", "cluster/bench-gpu.sh", str(out)],
        cwd=ROOT,
        env={k: v for k, v in {**os.environ, **tiny, **env}.items() if v is not None},  # None: the default
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.integration
def test_the_gpu_bench_script_runs_end_to_end_and_counts_flops_once(tmp_path):
    out = tmp_path / "bench"
    p = run_script(out, OPTIONAL="1", COMPILE_MODELS="", LARGE_MODELS="", FLUX_MODELS="")
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [json.loads((out / f"toyworld-fp32-r64-b{b}-compile_off.json").read_text()) for b in (1, 2)]
    assert [r["settings"]["batch"] for r in rows] == [1, 2]
    assert rows[0]["flops"]["source"] == "counted" and rows[1]["flops"]["source"] == str(out / "flops.json")
    assert rows[1]["flops"]["triplet_per_sample"] == rows[0]["flops"]["triplet_per_sample"] > 0
    [entry] = json.loads((out / "flops.json").read_text())  # one count for the model and setting
    assert entry["key"]["model"] == "toyworld" and entry["key"]["resolution"] == 64
    table = (out / "table.md").read_text()
    assert "toyworld-fp32-r64-b1-compile_off" in table and "toyworld-fp32-r64-b2-compile_off" in table
    assert (out / "skipped.txt").read_text() == "" and "core run:" in p.stdout


@pytest.mark.integration
def test_rows_past_the_budget_are_skipped_and_listed(tmp_path):
    out = tmp_path / "bench"
    p = run_script(out, CORE_BUDGET_S="0")
    assert p.returncode == 0, p.stdout + p.stderr
    assert len((out / "skipped.txt").read_text().splitlines()) == 2 and not list(out.glob("toyworld*.json"))


@pytest.mark.integration
def test_the_core_run_takes_sd15_arch_first_each_model_at_its_native_resolution(tmp_path):
    # the first H200 run had toyworld first at 512 px (its 128 x 128 latents: 28 TFLOP a triplet) and
    # spent the core budget before any sd15-arch row, the figure clusters are sized by
    out = tmp_path / "bench"
    p = run_script(out, CORE_BUDGET_S="0", MODELS=None, RESOLUTION=None, BATCHES=None)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [line.split()[0] for line in (out / "skipped.txt").read_text().splitlines()]
    assert rows == [f"{m}-fp32-b{b}-compile_off" for m in ("sd15-arch", "toyworld") for b in (1, 8, 32)]
