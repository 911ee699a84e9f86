"""Benchmark: UNet training steps/s of the toyworld pretraining recipe, by batch size, on one device.

It times `trainers.toyworld.pretrain.train_unet` itself (captions, tokenizer, text encoder + UNet forward and
backward, AdamW, EMA) on a small render pool, a fresh UNet of the given widths and a fresh VAE, so that the
figure is what a real run gets per step once its pool is rendered. Each batch size runs `--steps` steps in one
process with nothing else on the device; the final step's attention check (2 renders) is inside the time.
It prints one JSON line per batch size, then a summary line. A script that prints figures, not a test.

    python -m trainers.toyworld.pretrain_bench --device cuda --steps 200 --batches 128,512,2048
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from trainers.toyworld.pretrain import (
    PretrainConfig,
    hardware_name,
    prepare_device,
    render_pool,
    toyworld_tokenizer,
    train_unet,
)


def bench(device: str, steps: int, batches: list[int], channels: str, pool_size: int = 2000) -> dict:
    from factory.toyworld import model as tw

    prepare_device(device)  # as pretrain() does
    pool = render_pool(pool_size)
    results = []
    with tempfile.TemporaryDirectory() as d:
        tok = toyworld_tokenizer(Path(d) / "tok")
        vae = tw.build_vae().to(device).eval()
        for batch in batches:
            cfg = PretrainConfig(
                work_dir=d,
                unet_steps=steps,
                batch=batch,
                eval_every=10**6,
                eval_images=2,
                target_auc=None,
                ckpt_every=10**6,
                device=device,
                unet_channels=channels,
            )
            (Path(d) / "unet_ckpt.pt").unlink(missing_ok=True)  # each batch size starts fresh, not resumed
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            t = time.time()
            _, _, info = train_unet(cfg, vae, tok, pool, Path(d), None)
            seconds = info["train_minutes"] * 60
            row = {
                "batch": batch,
                "steps": steps,
                "steps_s": steps / seconds,
                "samples_s": batch * steps / seconds,
                "wall_s": time.time() - t,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
            }
            print(json.dumps(row), flush=True)
            results.append(row)
    return {"device": hardware_name(device), "unet_channels": channels, "results": results}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m trainers.toyworld.pretrain_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batches", default="16,128", help="comma-separated batch sizes")
    p.add_argument("--unet-channels", default="64,128,128")
    p.add_argument("--pool-size", type=int, default=2000)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    print(json.dumps(bench(args.device, args.steps, batches, args.unet_channels, args.pool_size)))


if __name__ == "__main__":
    main()
