"""cluster/train-dit-gpu.sh, run end to end on the CPU at tiny settings: the script a GPU slot runs to train
a larger toyworld DiT (issue 32) must work before the slot starts, and what it brings back must rebuild a
model that loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "SETUP": "none",
    "TRAINERS": f"{sys.executable} -m trainers.cli",
    "DEVICE": "cpu",
    "WIDTH": "32",
    "HEADS": "1",
    "DOUBLE": "1",
    "SINGLE": "1",
    "BATCH": "2",
    "POOL": "16",
    "EVAL_EVERY": "2",
    "EVAL_IMAGES": "2",
    "STEPS": "3",
}


@pytest.mark.integration
def test_the_gpu_dit_script_trains_packs_and_the_parts_rebuild_a_loadable_model(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run(
        ["bash", "cluster/train-dit-gpu.sh", str(out)],
        cwd=ROOT,
        env={**os.environ, **TINY, "WORK": str(tmp_path / "work")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 3 and info["config"]["width"] == 32 and info["config"]["batch"] == 2
    assert (tmp_path / "work" / "smoke" / "training.json").exists(), "the smoke run went first"
    parts = sorted(out.glob("model.tar.part-*"))
    assert parts and all(f.stat().st_size <= 15 * 2**20 for f in parts)
    # at most 8 files come back from a device call
    assert len([f for f in out.iterdir() if f.is_file()]) <= 8
    back = tmp_path / "back"
    back.mkdir()
    subprocess.run(f"cat {' '.join(map(str, parts))} | tar -x -C {back}", shell=True, check=True)
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(back / "model" / "transformer")
    assert transformer.config.num_layers == 1 and transformer.config.num_attention_heads == 1


@pytest.mark.integration
def test_a_failing_smoke_run_stops_the_script_before_the_run(tmp_path):
    p = subprocess.run(
        ["bash", "cluster/train-dit-gpu.sh", str(tmp_path / "out")],
        cwd=ROOT,
        env={**os.environ, **TINY, "DEVICE": "no-such-device", "WORK": str(tmp_path / "work")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1 and "smoke run failed" in p.stderr
    assert not (tmp_path / "work" / "model").exists()
