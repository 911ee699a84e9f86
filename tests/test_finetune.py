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
from factory.method.settings import Concept, DistillConfig, SampleSpec
from factory.toyworld.world import write_split
from trainers.finetune.train import export_pipeline, load_finetune_config, run_finetune

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


def test_a_run_resumes_at_another_world_size_and_refuses_a_zero3_change(trained, work):
    # the checkpoint of the run above (2 workers, ZeRO-2): one worker takes its weights, EMA and step, with
    # the optimizer afresh (DeepSpeed#2898: its partitions are per world size); ZeRO-3 partitions the weights
    # too, so a change to it is refused before Ray starts, saying what to do
    from trainers.finetune.worker import ResumeError

    with pytest.raises(ResumeError, match="resumes only as it was written.*scaling.workers=2"):
        run_finetune(ft_config(work, "train.max_steps=44", "output.name=run", "deepspeed.stage=3"))
    summary = run_finetune(
        ft_config(
            work, "train.max_steps=44", "output.name=run", "scaling.workers=1", "checkpoint.grid_images=0"
        )
    )
    state = summary["state"]
    assert state["resumed_from"] == 40 and state["step"] == 44 and state["world_size"] == 1
    assert state["zero_stage"] == 2 and math.isfinite(state["metrics"]["loss"])


def _train_workers() -> list[psutil.Process]:
    """This test's Ray Train worker processes (descendants of this process's local Ray, whatever else
    runs)."""
    me = os.getpid()
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and any(a.pid == me for a in p.parents())
    ]


LORA_KILLS = [None, "sdxl", "sd3", "flux2_klein", "z_image"]  # (FLUX's LoRA kill runs under ZeRO-3 above)
ZERO3_KILLS = ["sdxl", "sd3", "flux2_klein", "z_image"]  # (and FLUX's, above)


@pytest.mark.parametrize(
    "build, extra",
    [
        # the SD family (the scratch toyworld model), ZeRO-2: the slow lane since 2026-12-04 with the other
        # kills (71-113 s; `make test` had reached 25 min on a slow day); the default lane keeps resuming a
        # stopped run and resuming at another world size, which restore the same checkpoints
        pytest.param(None, (), marks=pytest.mark.slow),
        pytest.param("flux", ("deepspeed.stage=3",), marks=pytest.mark.slow),  # a DiT under ZeRO-3
        pytest.param("flux", ("deepspeed.stage=3", "lora={rank: 8}"), marks=pytest.mark.slow),
        pytest.param("sdxl", (), marks=pytest.mark.slow),
        pytest.param("sd3", (), marks=pytest.mark.slow),
        pytest.param("flux2_klein", (), marks=pytest.mark.slow),
        pytest.param("z_image", (), marks=pytest.mark.slow),
        # LoRA on every family, and ZeRO-3 on every DiT and SDXL too
        *[pytest.param(b, ("lora={rank: 8}",), marks=pytest.mark.slow) for b in LORA_KILLS],
        *[pytest.param(b, ("deepspeed.stage=3",), marks=pytest.mark.slow) for b in ZERO3_KILLS],
    ],
    ids=[
        "sd",
        "flux-zero3",
        "flux-lora-zero3",
        "sdxl",
        "sd3",
        "flux2_klein",
        "z_image",
        *[f"{b or 'sd'}-lora" for b in LORA_KILLS],
        *[f"{b}-zero3" for b in ZERO3_KILLS],
    ],
)
def test_a_killed_worker_resumes_from_the_last_checkpoint(work, build, extra):
    name = "-".join(["killed", build or "sd", *(x.split("=")[0].split(".")[-1] for x in extra)])
    model = []
    if build is not None:
        from tiny_models import BUILDERS

        if not (work / f"tiny-{build}").exists():
            BUILDERS[build]().save_pretrained(work / f"tiny-{build}")
        model = [f"model={work / f'tiny-{build}'}"]
    cfg = ft_config(
        work,
        *model,
        "train.max_steps=14",
        "checkpoint.every=4",
        f"output.name={name}",
        "checkpoint.grid_images=0",
        "scaling.max_failures=1",
        "output.export=null",
        *extra,
    )
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_finetune(cfg)), daemon=True)
    thread.start()
    run_dir = work / "runs" / name
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


def fine_tune_a_family(work, build: str, *extra, name: str | None = None) -> None:
    """Step 3 for another family (issue 34) on its tiny random pipeline: 30 steps on 2 DeepSpeed workers,
    the denoiser conditioned and called as the family's pipeline does it (SDXL's pooled embedding and size
    ids; SD3's and FLUX's flow-matching velocity at logit-normal sigmas, FLUX's packed latents and guidance
    embedding), every text encoder and the VAE frozen; the fixed-batch loss falls, and the EMA export
    inpaints in the Distiller as the fine-tuned m'."""
    from tiny_models import BUILDERS

    from factory.method.families import detect_family

    base = BUILDERS[build]()
    base.save_pretrained(work / f"tiny-{build}")
    summary = run_finetune(
        ft_config(
            work,
            f"model={work / f'tiny-{build}'}",
            "train.max_steps=30",
            "train.lr=1e-3",
            f"output.name={name or build}",
            f"output.export={work / f'export-{name or build}'}",
            *extra,
        )
    )
    m = summary["state"]["metrics"]
    # the fixed batch's loss fell (untrained, it stays where it was: fixed noise and timesteps): by a fifth
    # for epsilon targets; by a tenth for a velocity target (noise - z0, variance about 2, keeps more that no
    # model can predict from z_t) and for adapters on the attention alone (a tiny UNet's convolutions hold
    # most of its weights)
    lora = any(x.startswith("lora=") for x in extra)
    fell = 0.9 if lora or build in ("sd3", "flux", "flux2_klein", "z_image") else 0.8
    assert summary["state"]["step"] == 30 and m["probe_loss"] < fell * m["probe_loss_initial"], m
    pipe = load_pipeline(summary["export"])
    family, base_family = detect_family(pipe), detect_family(base)
    trained = zip(family.denoiser_module.parameters(), base_family.denoiser_module.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in trained)
    for part in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        a, b = getattr(pipe, part, None), getattr(base, part, None)
        if b is not None:
            assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True)), part
    config = DistillConfig(num_inference_steps=4, probe_t0=3, inpaint_steps=4, resolution=32)
    d = Distiller(f"tiny-{build}", pipeline=base, config=config, inpaint_model=summary["export"])
    [t] = d.synthesize([SampleSpec(Concept("star"), 0)])
    assert t.meta["inpaint_model"] == f"export-{name or build}" and t.mask.shape == t.image.shape[:2]
    assert (Path(summary["checkpoint"]) / "samples.png").exists()


def test_a_flux_model_fine_tunes_under_zero3_and_its_export_inpaints(work, short_job):
    # ZeRO-3 partitions the transformer's parameters too: the EMA and the sample grid gather them
    fine_tune_a_family(work, "flux", "deepspeed.stage=3")
    # the export as a `factory generate` job's inpaint.model: the preflight reads and fits it, the actors
    # load it, the triplets record it
    import json

    from factory.dataset.shards import ShardStore

    cfg = load_config(
        "configs/toyworld.yaml",
        [
            f"model={work / 'tiny-flux'}",
            f"inpaint.model={work / 'export-flux'}",
            f"output.uri={work / 'job-flux'}",
            "concepts=[{name: star, samples: 2}]",
            "sampler.resolution=32",
            "output.samples_per_shard=2",
            *short_job,
        ],
    )
    assert run_job(cfg, "generate", progress=False)["complete"]
    [meta] = {
        json.loads(r["json"])["inpaint_model"]
        for r in ShardStore(str(work / "job-flux")).read_shard("shard-000000.tar")
    }
    assert meta == "export-flux"


@pytest.mark.slow
@pytest.mark.parametrize(
    "build, extra",
    [
        ("flux", ()),
        ("flux", ("deepspeed.stage=3",)),  # the frozen base partitioned too; the EMA gathers the adapters
        ("sdxl", ()),
        ("sd3", ()),
        ("flux2_klein", ()),
        ("z_image", ()),
    ],
    ids=["flux", "flux-zero3", "sdxl", "sd3", "flux2_klein", "z_image"],
)
def test_lora_adapters_fine_tune_and_both_their_exports_inpaint(work, build, extra):
    # LoRA (rank 16 on the attention projections, 10x the full run's rate as LoRA runs use): the base stays
    # as it was in training; the export fuses the adapters into a full folder and keeps them in lora/
    name = f"{build}-lora" + ("-zero3" if extra else "")
    fine_tune_a_family(work, build, "lora={rank: 16}", "train.lr=1e-2", *extra, name=name)
    export = work / f"export-{name}"
    assert (export / "lora" / "pytorch_lora_weights.safetensors").exists()
    from safetensors.torch import load_file

    [checkpoint] = sorted((work / "runs" / name).glob("checkpoint_*/ema_unet.safetensors"))[-1:]
    ema = load_file(str(checkpoint))
    assert ema and all(".lora_" in n for n in ema), "only the adapters were trained"
    # the same checkpoint exported as the adapter alone (`output.fused: false`) inpaints on the base model
    adapter = export_pipeline(
        str(work / f"tiny-{build}"), str(checkpoint.parent), str(work / f"{name}-adapter"), False
    )
    config = DistillConfig(num_inference_steps=4, probe_t0=3, inpaint_steps=4, resolution=32)
    d = Distiller(str(work / f"tiny-{build}"), config=config, inpaint_model=adapter)
    [t] = d.synthesize([SampleSpec(Concept("star"), 0)])
    assert t.meta["inpaint_model"] == f"{name}-adapter" and not (Path(adapter) / "model_index.json").exists()


@pytest.mark.slow  # ~40 s each: the default lane keeps FLUX's (above), `make test-slow` runs these
@pytest.mark.parametrize("build", ["sdxl", "sd3", "flux2_klein", "z_image"])
def test_the_other_families_fine_tune_and_their_exports_inpaint(work, build):
    fine_tune_a_family(work, build)
