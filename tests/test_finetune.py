"""Concept fine-tuning on a real local Ray with real DeepSpeed: ZeRO-2 over gloo on 2 CPU workers.

One module-level run labels 16 toyworld star images with `factory label` (no ground truth), fine-tunes for
30 steps and exports; the tests then check the run, the export, a manual resume and the recovery from a
killed worker. DeepSpeed JIT-compiles its shared-memory comm op on the first run of a machine (~30-60 s).
"""

import math
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from diffusers import UNet2DConditionModel

from factory.dataset.config import load_config
from factory.dataset.pipeline import run_job
from factory.dataset.sources import list_images
from factory.method.distiller import Distiller
from factory.method.loading import load_pipeline
from factory.method.settings import Concept, SampleSpec
from factory.toyworld.world import write_split
from trainers.finetune.train import load_finetune_config, run_finetune

pytestmark = pytest.mark.training  # Ray Train + DeepSpeed: `make test-fast` skips these


@pytest.fixture(scope="module")
def work(tmp_path_factory, local_ray):
    d = tmp_path_factory.mktemp("ft")
    write_split(d / "train", range(2_000_000_000, 2_000_000_016), concept="star")
    cfg = load_config(
        "configs/toyworld-label.yaml",
        [
            f"output.uri={d / 'label'}",
            "sampler.steps=6",
            "sampler.probe_t0=4",
            "inpaint.steps=6",
            "output.samples_per_shard=8",
            "output.report_samples=0",
        ],
    )
    assert run_job(cfg, "label", list_images(str(d / "train" / "images")), progress=False)["complete"]
    # The toyworld model with a freshly initialised UNet: its loss must fall within a few steps, which a
    # converged UNet's need not (its fixed-batch loss is already near its floor).
    pipe = load_pipeline("toyworld")
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel.from_config(pipe.unet.config)
    pipe.save_pretrained(d / "scratch-model")
    return d


def ft_config(d: Path, *extra):
    return load_finetune_config(
        "configs/finetune-toyworld.yaml",
        [
            f"model={d / 'scratch-model'}",
            f"data.shards=[{d / 'label'}]",
            f"output.storage={d / 'runs'}",
            "train.micro_batch=4",
            "train.log_every=5",
            "checkpoint.every=10",
            "checkpoint.grid_images=1",
            "checkpoint.grid_steps=4",
            "data.shuffle_buffer=8",
            f"output.export={d / 'export'}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def trained(work):
    return run_finetune(ft_config(work, "train.max_steps=30", "train.lr=1e-3", "output.name=run"))


def test_two_deepspeed_workers_train_and_the_loss_falls(trained):
    state = trained["state"]
    m = state["metrics"]
    assert state["step"] == 30 and state["world_size"] == 2 and state["resumed_from"] is None
    assert math.isfinite(m["loss"]) and math.isfinite(m["loss_full"]) and math.isfinite(m["loss_background"])
    # the masked loss on a fixed batch (fixed noise and timesteps) fell during these 30 steps
    assert m["probe_loss"] < 0.8 * m["probe_loss_initial"]
    files = {p.name for p in Path(trained["checkpoint"]).rglob("*")}
    # Ray Train merged both ranks' ZeRO-2 partitions into one checkpoint, beside the EMA and a sample grid
    assert {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "mp_rank_00_model_states.pt",
        "ema_unet.safetensors",
        "state.json",
        "samples.png",
    } <= files


def test_exported_pipeline_loads_and_generates(trained, work, fast_config):
    export = trained["export"]
    assert (Path(export) / "model_index.json").exists() and (Path(export) / "finetune.json").exists()
    pipe = load_pipeline(export)  # what `factory generate --set model=DIR` does
    base = load_pipeline(str(work / "scratch-model"))
    changed = [
        not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), base.unet.parameters(), strict=True)
    ]
    assert any(changed), "the exported UNet carries the fine-tuned EMA weights"
    for a, b in [(pipe.vae, base.vae), (pipe.text_encoder, base.text_encoder)]:
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True)), "frozen"
    [t] = Distiller(export, pipeline=pipe, config=fast_config).synthesize([SampleSpec(Concept("star"), 0)])
    assert t.image.shape == (64, 64, 3) and t.mask.shape == (64, 64) and t.meta["model"] == "export"


def test_running_the_same_config_again_resumes_the_stopped_run(trained, work):
    summary = run_finetune(
        ft_config(work, "train.max_steps=40", "train.lr=1e-3", "output.name=run", "checkpoint.grid_images=0")
    )
    assert summary["state"]["resumed_from"] == 30 and summary["state"]["step"] == 40


def _train_workers() -> list[psutil.Process]:
    """This test's Ray Train worker processes (descendants of this process's local Ray, whatever else
    runs)."""
    me = os.getpid()
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and any(a.pid == me for a in p.parents())
    ]


def test_a_killed_worker_resumes_from_the_last_checkpoint(work):
    cfg = ft_config(
        work,
        "train.max_steps=14",
        "checkpoint.every=4",
        "output.name=killed",
        "checkpoint.grid_images=0",
        "scaling.max_failures=1",
        "output.export=null",
    )
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_finetune(cfg)), daemon=True)
    thread.start()
    run_dir = work / "runs" / "killed"
    deadline = time.time() + 300
    # Kill once the second checkpoint is on disk: by then the first is registered with Ray Train (a report
    # is a barrier across the workers), so the restart has a checkpoint to resume from.
    while time.time() < deadline and len(list(run_dir.glob("checkpoint_*/state.json"))) < 2:
        time.sleep(0.2)
    victims = _train_workers()
    assert victims, "no Ray Train worker process found to kill"
    os.kill(victims[-1].pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive() and result, "training did not finish after the worker was killed"
    state = result["state"]
    assert state["step"] == 14 and state["resumed_from"] is not None and 4 <= state["resumed_from"] < 14


def test_an_sdxl_model_fine_tunes_and_its_export_inpaints(work, fast_config):
    """Step 3 for SDXL (issue 34): the same run on a tiny random SDXL pipeline, its UNet conditioned as the
    family's pipeline conditions it (both CLIPs' tokens, the pooled embedding and the size ids), both text
    encoders and the VAE frozen; its EMA export inpaints in the Distiller as the fine-tuned m'."""
    from tiny_models import sdxl_pipeline

    base = sdxl_pipeline()
    base.save_pretrained(work / "tiny-sdxl")
    summary = run_finetune(
        ft_config(
            work,
            f"model={work / 'tiny-sdxl'}",
            "train.max_steps=30",
            "train.lr=1e-3",
            "output.name=sdxl",
            f"output.export={work / 'export-sdxl'}",
        )
    )
    m = summary["state"]["metrics"]
    assert summary["state"]["step"] == 30 and m["probe_loss"] < 0.8 * m["probe_loss_initial"]
    pipe = load_pipeline(summary["export"])
    assert any(
        not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), base.unet.parameters(), strict=True)
    )
    for a, b in [
        (pipe.vae, base.vae),
        (pipe.text_encoder, base.text_encoder),
        (pipe.text_encoder_2, base.text_encoder_2),
    ]:
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True)), "frozen"
    d = Distiller("tiny-sdxl", pipeline=base, config=fast_config, inpaint_model=summary["export"])
    [t] = d.synthesize([SampleSpec(Concept("star"), 0)])
    assert t.meta["inpaint_model"] == "export-sdxl" and t.mask.shape == t.image.shape[:2]
    assert (Path(summary["checkpoint"]) / "samples.png").exists()
