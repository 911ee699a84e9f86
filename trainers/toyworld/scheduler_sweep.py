"""Mask quality against sampler and step count: refined-mask IoU on a labelled toyworld split.

Label mode, as the paper's real images: the attention probe keeps the paper's DDIM grid (40 of 50 steps) and
is computed once per image; every setting then inpaints the same M_pre with its own sampler and step count
from the same generator states, so the settings differ only in Step 4.

    factory toyworld-split --out out/toyworld-test --seeds 3000000000:3000000150
    trainers scheduler-sweep --split out/toyworld-test --out docs/results/scheduler-sweep.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from factory.method.distiller import Concept, DistillConfig, Distiller, SampleSpec
from factory.method.loading import load_pipeline
from trainers.evaluate.method_masks import load_pair, read_split
from trainers.evaluate.metrics import PooledSegmentationMetrics

DEFAULT_GRID = ["ddim:50", "ddim:25", "ddim:15", "ddim:10"] + [
    f"{s}:{k}" for s in ("dpm++", "unipc", "euler") for k in (25, 15, 10)
]


def sweep(split: str, grid: list[str], n: int | None = None, batch: int = 8, model: str = "toyworld") -> dict:
    pipe = load_pipeline(model)
    base = Distiller(model, pipeline=pipe, config=DistillConfig())
    settings = [(g.split(":")[0], int(g.split(":")[1])) for g in grid]
    variants = {
        (s, k): Distiller(model, pipeline=pipe, config=DistillConfig(inpaint_scheduler=s, inpaint_steps=k))
        for s, k in settings
    }
    rows = read_split(split, n)
    metrics = {key: PooledSegmentationMetrics() for key in settings}
    prelim = PooledSegmentationMetrics()
    seconds = dict.fromkeys(settings, 0.0)
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        pairs = [load_pair(Path(split), r) for r in chunk]
        specs = [
            SampleSpec(Concept(r["concept"]), int(r.get("seed", i + j)), f"s{i + j}")
            for j, r in enumerate(chunk)
        ]
        probed = base._probe([p[0] for p in pairs], specs)
        states = [g.get_state() for g in probed[1]]
        for key, d in variants.items():
            for g, st in zip(probed[1], states, strict=True):
                g.set_state(st)
            t = time.perf_counter()
            triplets = d._finish(*probed[:-1], dict(probed[-1]), "label")
            seconds[key] += time.perf_counter() - t
            for (_, gt), tr in zip(pairs, triplets, strict=True):
                metrics[key].update(tr.mask, gt)
                if key == settings[0]:
                    from factory.method.geometry import resize_mask

                    c, f = tr.meta["canvas"], d.vae_factor
                    prelim.update(
                        resize_mask(tr.prelim[: -(-c["valid_h"] // f), : -(-c["valid_w"] // f)], *gt.shape),
                        gt,
                    )
    return {
        "split": str(split),
        "n_images": len(rows),
        "probe": "ddim 50 steps, attention over the 40 least-noisy (the paper's)",
        "prelim_iou": prelim.compute()["iou"],
        "settings": [
            {
                "scheduler": s,
                "steps": k,
                "refined_iou": metrics[(s, k)].compute()["iou"],
                "inpaint_s_per_image": seconds[(s, k)] / len(rows),
            }
            for s, k in settings
        ],
        "torch_threads": torch.get_num_threads(),
    }


def markdown(res: dict) -> str:
    ref = next(r for r in res["settings"] if (r["scheduler"], r["steps"]) == ("ddim", 50))
    lines = [
        f"Refined-mask IoU on {res['n_images']} images of `{res['split']}`; probe: {res['probe']}; "
        f"M_pre IoU {100 * res['prelim_iou']:.1f}.",
        "",
        "| Step 4 sampler | steps | refined M IoU | vs DDIM 50 | inpainting time vs DDIM 50 |",
        "|---|---|---|---|---|",
    ]
    for r in res["settings"]:
        lines.append(
            f"| {r['scheduler']} | {r['steps']} | {100 * r['refined_iou']:.1f} | "
            f"{100 * (r['refined_iou'] - ref['refined_iou']):+.1f} | "
            f"{r['inpaint_s_per_image'] / ref['inpaint_s_per_image']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="trainers scheduler-sweep", description=__doc__)
    p.add_argument("--split", required=True)
    p.add_argument("--grid", nargs="+", default=DEFAULT_GRID, help="SCHEDULER:STEPS settings")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=None, help="write the results here as JSON (and .md beside it)")
    a = p.parse_args(argv)
    res = sweep(a.split, a.grid, a.n, a.batch)
    print(markdown(res))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
        Path(a.out).with_suffix(".md").write_text(markdown(res))


if __name__ == "__main__":
    main()
