"""Concept fine-tuning (paper Step 3): DeepSpeed inside a Ray Train TorchTrainer.

    trainers finetune configs/finetune-toyworld.yaml [--set KEY=VALUE ...]
    trainers finetune CONFIG --export-only          # re-export the EMA pipeline of the latest checkpoint

The denoiser of a model (any family: a UNet, or a DiT's transformer) becomes the paper's m': it keeps
painting "a photo of a {concept}" and learns to paint a clean "a photo of a background" inside background
rectangles. The data are the user's unlabeled images with their preliminary masks, as written by `factory
label` (WebDataset shards, any fsspec URL), streamed through Ray Data (`trainers.finetune.data`).

One training step on each worker, top to bottom:
  batch of examples (image, prompt, loss mask) from the worker's Ray Data shard
  -> z0 = the family's VAE encoding of x        (frozen, fp32 where the family's pipeline upcasts it; the
                                                 text encoders are frozen too)
  -> t, z_t, target = the objective's           (`trainers.finetune.objectives`: epsilon or v on the DDPM
                                                 schedule, t ~ U{0..T-1}; or the flow velocity noise - z0 at
                                                 logit-normal sigmas for SD3, FLUX.1/2, Z-Image)
  -> loss = mean((mask * (denoiser(z_t, t, cond(prompt)) - target))^2)
                                                (the family's call and conditioning: SDXL's pooled embedding
                                                 and size ids, FLUX's packing and guidance; not normalised by
                                                 mask area, as the paper; `train.normalize_loss` divides per
                                                 sample)
  -> DeepSpeed backward + step (ZeRO stage 2 by default; stage 3 and optimizer offload selectable)
  -> EMA update (rank 0 keeps the EMA; with ZeRO-3 the parameters are gathered for it)
Every `checkpoint.every` steps all ranks write their DeepSpeed shards, rank 0 adds the EMA weights, the
training state and a sample grid, and each reports its folder to Ray Train, which merges them into one
checkpoint. A worker failure restarts the workers from the latest checkpoint (`scaling.max_failures`);
running the same config again resumes a stopped run (at another number of workers too, under ZeRO-1/2).
At the end the driver exports the EMA denoiser with the base model's other components as a diffusers
pipeline directory that `factory generate --set model=DIR` or `--set inpaint.model=DIR` loads.

Departures from the paper (method.md Step 3): AdamW with a constant lr and no 1-step warm-up; the
rectangle limits scale with the latent grid (`trainers.finetune.rectangles`); both tasks' images are clamped.

Families (`factory.method.families`): fine-tuning serves the families whose m' may inpaint
(`finetuned_inpainting`: all of them). The step goes through the family: its conditioning (SDXL's pooled
embedding and size ids), its denoiser call (FLUX's packing and guidance embedding), its VAE; what the
denoiser learns is `trainers.finetune.objectives`' (epsilon / v on the DDPM schedule, or for SD3, FLUX.1/2
and Z-Image the flow-matching velocity at logit-normal sigmas; departures in docs/finetune.md).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from factory.dataset.console import verbose_from_env
from factory.dataset.ray_start import init_ray
from factory.dataset.shards import decode_sample
from factory.dataset.sources import storage_path
from factory.errors import UserError
from factory.method.loading import quiet_model_libraries
from trainers.devices import (
    all_reduce,
    check_engine_device,
    deepspeed_args,
    skip_inference_allreduce_build,
)
from trainers.finetune.config import FinetuneConfig, deepspeed_config, load_finetune_config
from trainers.finetune.objectives import training_objective
from trainers.finetune.worker import (
    EMA_FILE,
    STATE_FILE,
    Checkpoints,
    EngineCall,
    FixedBatch,
    LossWindow,
    PromptEmbeddings,
    add_lora,
    check_resume,
    encode_latents,
    full_parameters,
    masked_mse,
    validation_images,
)


class FinetuneFamilyError(UserError):
    """The model is of a family whose fine-tuning is not served (SDXL, SD3, FLUX.1/2, Z-Image)."""


# ----------------------------------------------------------------------------- the worker


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker.

    1. the worker's context: rank, world size, device, seeds;
    2. the model: the base pipeline, VAE and text encoder frozen, the UNet trained;
    3. DeepSpeed: the optimizer (or ZeRO-Offload's CPU Adam) and the engine; rank 0 keeps the EMA;
    4. resume from Ray Train's latest checkpoint, if any (`Checkpoints`);
    5. the training loop over this worker's Ray Data shard: encode, noise, masked loss, DeepSpeed step, EMA;
    6. every `train.log_every` steps the metrics (all-reduced), every `checkpoint.every` steps a checkpoint.
    """
    # 1. The worker's context.
    import deepspeed
    import ray.train
    import ray.train.torch

    from factory.method.families import detect_family
    from factory.method.loading import load_pipeline
    from trainers.ema import EMA

    cfg = FinetuneConfig.model_validate(config["job"])
    quiet_model_libraries(bool(config.get("verbose")))
    ds_config = config["deepspeed"]
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # the one device of the model, the data, the EMA and collectives
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    else:
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.train.seed * 1000 + rank)

    # 2. The model: its family's denoiser trained; the VAE (the method's, fp32 where the family's pipeline
    # upcasts it) and every text encoder frozen.
    pipe = load_pipeline(cfg.model, str(device), "fp32")
    family = detect_family(pipe)
    unet, vae = family.denoiser_module, family.method_vae()
    for frozen in (vae, *(getattr(pipe, f"text_encoder{s}", None) for s in ("", "_2", "_3"))):
        if frozen is not None:
            frozen.requires_grad_(False)
    # the whole denoiser, or (`lora`) its adapters alone: the base frozen, the adapters' parameters trained
    unet.requires_grad_(cfg.lora is None)
    if cfg.lora is not None:
        add_lora(unet, cfg.lora)
    unet.train()
    if cfg.checkpointing():
        unet.enable_gradient_checkpointing()
    objective = training_objective(family, config["resolution"])  # DDPM epsilon / v, or flow matching
    embed = PromptEmbeddings(family)

    # 3. DeepSpeed and the EMA.
    params = [p for p in unet.parameters() if p.requires_grad]
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(
            params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, adamw_mode=True
        )
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    skip_inference_allreduce_build(device)
    engine, _, _, _ = deepspeed.initialize(
        args=deepspeed_args(device), model=unet, optimizer=optimizer, config=ds_config
    )
    check_engine_device(engine.device, device)  # DeepSpeed would go by LOCAL_RANK (trainers.devices)
    # the family's call (SDXL's added conditioning, FLUX's packing and guidance) through the engine, and on
    # the module itself for the fixed batch's loss (no gradient, no DeepSpeed step)
    denoiser = family.denoiser(EngineCall(engine))
    module_denoiser = family.denoiser(engine.module)
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision(), torch.float32)
    names = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    trained = [p for p in engine.module.parameters() if p.requires_grad]
    ema = None
    with full_parameters(trained, stage):
        if rank == 0:
            ema = EMA(trained, cfg.train.ema_decay)

    # 4. Resume.
    validation = validation_images(config["shard_urls"], cfg.checkpoint.grid_images) if rank == 0 else []
    checkpoints = Checkpoints(cfg, engine, ema, names, rank, world, stage, family, validation)
    state = checkpoints.resume()

    # 5. Train.
    fixed, fixed_initial = None, math.nan
    shard = ray.train.get_dataset_shard("train")
    window = LossWindow(device)
    t_window, steps_window = time.time(), 0
    t_start = time.time()
    micro = 0
    while state.step < cfg.train.max_steps:
        seen_batch = False
        for batch in shard.iter_batches(
            batch_size=cfg.train.micro_batch,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
        ):
            seen_batch = True
            x = torch.from_numpy(batch["pixel_values"]).to(device)
            mask = torch.from_numpy(batch["loss_mask"]).to(device)
            with torch.no_grad():
                z0 = encode_latents(vae, x)
                emb = embed(list(batch["prompt"]))
            if fixed is None:  # this worker's first batch, kept with fixed noise: a steady loss to watch
                fixed = FixedBatch.draw(objective, z0, emb, mask, seed=cfg.train.seed + 7 * rank)
                fixed_initial = fixed.loss(module_denoiser, compute_dtype, cfg.train.normalize_loss)
            noise = torch.randn_like(z0)
            t = objective.sample_t(z0.shape[0], device)
            z_t = objective.noisy(z0, noise, t)
            target = objective.target(z0, noise, t)
            pred = denoiser(z_t.to(compute_dtype), t, emb.to(compute_dtype)).float()
            loss = masked_mse(pred, target, mask, cfg.train.normalize_loss)
            engine.backward(loss)
            engine.step()
            with torch.no_grad():
                window.add((pred - target).pow(2).mul(mask[:, None]).flatten(1).mean(1), batch["task"])
            state.samples_seen += x.shape[0] * world
            micro += 1
            if micro % cfg.train.grad_accum:
                continue  # DeepSpeed applies the optimizer step on the accumulation boundary only
            state.step += 1
            steps_window += 1
            with full_parameters(trained, stage):
                if ema is not None:
                    ema.update(trained)

            # 6. Metrics and checkpoints.
            last = state.step >= cfg.train.max_steps
            checkpoint_now = state.step % cfg.checkpoint.every == 0 or last
            if state.step % cfg.train.log_every == 0 or checkpoint_now:
                totals = window.reduce()
                dt = time.time() - t_window
                fixed_losses = torch.tensor(
                    [fixed.loss(module_denoiser, compute_dtype, cfg.train.normalize_loss), fixed_initial],
                    dtype=torch.float64,
                    device=device,
                )
                fixed_now, fixed_then = (all_reduce(fixed_losses, device).cpu() / world).tolist()
                metrics = {
                    "step": state.step,
                    **totals.metrics(),
                    "steps_per_s": steps_window / dt,
                    "samples_per_s": totals.samples / dt,
                    "samples_seen": state.samples_seen,
                    "elapsed_s": time.time() - t_start,
                    "probe_loss": fixed_now,
                    "probe_loss_initial": fixed_then,
                }
                t_window, steps_window = time.time(), 0
                if rank == 0:
                    print(
                        f"[finetune] step {state.step}/{cfg.train.max_steps} loss {metrics['loss']:.4f} "
                        f"(object {metrics['loss_full']:.4f}, background {metrics['loss_background']:.4f}; "
                        f"fixed batch {fixed_then:.4f} -> {fixed_now:.4f}) "
                        f"{metrics['steps_per_s']:.2f} steps/s {metrics['samples_per_s']:.1f} samples/s",
                        flush=True,
                    )
                if checkpoint_now:
                    checkpoints.save(state, metrics)
                else:
                    ray.train.report(metrics)
            if last:
                break
        if not seen_batch:
            raise RuntimeError(
                "this worker's data shard is empty: there are fewer training samples than "
                f"workers x micro_batch ({world} x {cfg.train.micro_batch})"
            )


# ----------------------------------------------------------------------------- the driver


def check_family(model: str) -> None:
    """Fine-tuning serves the families whose fine-tuned m' may inpaint (`finetuned_inpainting`: every
    family served today); another is refused from its configs alone, before Ray starts."""
    from factory.method.families import FAMILIES
    from factory.method.loading import read_model_configs

    family = FAMILIES[read_model_configs(model, components=())["family"]]
    if not family.finetuned_inpainting:
        served = ", ".join(n for n, f in FAMILIES.items() if f.finetuned_inpainting)
        raise FinetuneFamilyError(
            f"model {model!r} is of the {family.name} family; fine-tuning (paper Step 3) serves the "
            f"families {served} so far. Label and generate with it without inpaint.model: the pretrained "
            "model inpaints the backgrounds."
        )


def latest_checkpoint(cfg: FinetuneConfig):
    """The newest complete checkpoint of this run (by training step), or None."""
    import fsspec
    from ray.train import Checkpoint

    fs, root = fsspec.core.url_to_fs(f"{storage_path(cfg.output.storage)}/{cfg.output.name}")
    if not fs.exists(root):
        return None
    best = None
    for path in fs.ls(root, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("checkpoint_") or not fs.exists(f"{path}/{STATE_FILE}"):
            continue
        if not fs.exists(f"{path}/{EMA_FILE}"):
            continue
        with fs.open(f"{path}/{STATE_FILE}") as f:
            step = json.load(f)["step"]
        if best is None or step > best[0]:
            best = (step, path)
    if best is None:
        return None
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return Checkpoint(best[1] if proto in ("file", "local") else f"{proto}://{best[1]}")


def export_pipeline(model: str, checkpoint_dir: str, out: str, fused: bool = True) -> str:
    """The base model with the checkpoint's EMA denoiser, saved as a diffusers pipeline directory (local or
    any fsspec URL); a LoRA run's adapters also in `lora/`, or (`fused` false) there alone. Its
    `finetune.json` holds the run's state, the base model and the denoiser's config."""
    import fsspec
    from safetensors.torch import load_file

    from factory.method.families import detect_family
    from factory.method.loading import LORA_FOLDER, load_pipeline
    from trainers.finetune.config import LoraConfig

    pipe = load_pipeline(model, "cpu", "fp32")
    module = detect_family(pipe).denoiser_module
    state = json.loads((Path(checkpoint_dir) / STATE_FILE).read_text())
    lora = LoraConfig.model_validate(state["lora"]) if state.get("lora") else None
    if lora is not None:
        add_lora(module, lora)
    shadow = load_file(str(Path(checkpoint_dir) / EMA_FILE))
    missing, unexpected = module.load_state_dict(shadow, strict=False)
    # what the EMA holds: the trained parameters (not buffers such as SD3's positional table), or the adapters
    trained = {n for n, _ in module.named_parameters() if lora is None or ".lora_" in n}
    if unexpected or trained & set(missing):
        raise RuntimeError(
            f"the EMA weights do not fit {model!r}'s denoiser (missing {sorted(trained & set(missing))[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}): was the run trained from another model?"
        )
    fs, root = fsspec.core.url_to_fs(out)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(root) if local else Path(tmp) / "export"
        if lora is not None:  # the adapter as it is, then (`fused`) fused into the denoiser for a full folder
            module.save_lora_adapter(str(target / LORA_FOLDER))
        if lora is None or fused:
            if lora is not None:
                module.fuse_lora()
                module.unload_lora()
            pipe.save_pretrained(target, safe_serialization=True)
        # the denoiser's config: what an adapter alone is checked against before it is loaded on a model
        record = {
            "base_model": model,
            "denoiser": json.loads(json.dumps(dict(module.config), default=str)),
            **state,
        }
        target.mkdir(parents=True, exist_ok=True)
        (target / "finetune.json").write_text(json.dumps(record, indent=1))
        if (Path(checkpoint_dir) / "samples.png").exists():
            (target / "samples.png").write_bytes((Path(checkpoint_dir) / "samples.png").read_bytes())
        if not local:
            fs.put(str(target), root, recursive=True)
    return out


def run_finetune(cfg: FinetuneConfig, export_only: bool = False, verbose: bool | None = None) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from factory.dataset.sources import list_shards
    from factory.method.loading import model_geometry
    from trainers.finetune.data import to_examples

    verbose = verbose_from_env() if verbose is None else verbose
    quiet_model_libraries(verbose)  # the driver loads the model too, to export it
    check_family(cfg.model)
    urls = [u for src in cfg.data.shards for u in list_shards(src)]
    resume = latest_checkpoint(cfg)
    if export_only:
        if resume is None:
            raise FileNotFoundError(
                f"no checkpoint of run {cfg.output.name!r} under {storage_path(cfg.output.storage)}"
            )
        result_checkpoint = resume
    else:
        ds_config = deepspeed_config(cfg)
        if resume is not None:  # another world size or ZeRO stage: resumable, or a clear error now
            with resume.as_directory() as d:
                saved = json.loads((Path(d) / STATE_FILE).read_text())
            check_resume(saved, cfg.scaling.workers, int(ds_config["zero_optimization"].get("stage", 0)))
        resolution, vae_factor = model_geometry(cfg.model)
        print(
            f"[finetune] {cfg.model}: {len(urls)} shards, {cfg.scaling.workers} workers "
            f"({'GPU' if cfg.scaling.use_gpu else 'CPU'}), ZeRO stage "
            f"{ds_config['zero_optimization'].get('stage', 0)}, {cfg.train.max_steps} steps of "
            f"{cfg.train.micro_batch} x {cfg.train.grad_accum} x {cfg.scaling.workers} samples"
            + (f"; resuming from {resume.path}" if resume else ""),
            flush=True,
        )
        init_ray(verbose)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = ray.data.read_webdataset(
            urls, shuffle="files", decoder=decode_sample, num_cpus=cfg.data.map_num_cpus
        ).map_batches(
            to_examples,
            batch_size=16,
            num_cpus=cfg.data.map_num_cpus,
            fn_kwargs={
                "resolution": resolution,
                "vae_factor": vae_factor,
                "background_prompt": cfg.data.background_prompt,
                "p_full": cfg.data.p_full,
                "concepts": cfg.data.concepts,
            },
        )
        resources = {"CPU": cfg.scaling.cpus_per_worker}
        if cfg.scaling.use_gpu:
            resources["GPU"] = cfg.scaling.gpus_per_worker
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "job": cfg.model_dump(),
                "deepspeed": ds_config,
                "shard_urls": urls[:4],
                "resolution": resolution,
                "verbose": verbose,
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.scaling.workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name=cfg.output.name,
                storage_path=storage_path(cfg.output.storage),
                failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            ),
            datasets={"train": ds},
        )  # same name + storage_path: Ray Train v2 restores the run's latest checkpoint by itself
        result = trainer.fit()
        if result.error:
            raise result.error
        result_checkpoint = result.checkpoint
    summary = {"checkpoint": result_checkpoint.path if result_checkpoint else None, "export": None}
    if result_checkpoint is not None:
        with result_checkpoint.as_directory() as d:
            summary["state"] = json.loads((Path(d) / STATE_FILE).read_text())
            if cfg.output.export:
                summary["export"] = export_pipeline(cfg.model, d, cfg.output.export, cfg.output.fused)
    st = summary.get("state", {})
    print(
        f"[finetune] done: step {st.get('step')}, "
        f"last loss {st.get('metrics', {}).get('loss', math.nan):.4f}; "
        f"checkpoint {summary['checkpoint']}"
        + (
            f"; EMA export in {summary['export']} (a job's m': --set inpaint.model={summary['export']})"
            if summary["export"]
            else ""
        ),
        flush=True,
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from factory.yaml_config import ConfigError

    p = argparse.ArgumentParser(
        prog="trainers finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("config", help="fine-tuning YAML (see configs/finetune-*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--export-only", action="store_true", help="export the latest checkpoint's EMA pipeline")
    p.add_argument(
        "--verbose", action="store_true", help="show Ray's and diffusers' log lines and loading bars"
    )
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    try:
        cfg = load_finetune_config(a.config, a.set)
        if not a.export_only:
            deepspeed_config(cfg)  # fail before Ray starts
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"trainers finetune: error: {err}", file=sys.stderr)
        return 2
    run_finetune(cfg, export_only=a.export_only, verbose=a.verbose or None)
    return 0
