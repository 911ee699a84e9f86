"""Mask quality against sampler and step count: refined-mask IoU on a labelled toyworld split.

Label mode, as the paper's real images: the attention probe keeps the paper's DDIM grid (40 of 50 steps) and
is computed once per image; every setting then inpaints the same M_pre with its own sampler and step count
from the same generator states, so the settings differ only in Step 4.

    factory toyworld-split --out out/toyworld-test --seeds 3000000000:3000000150
    trainers scheduler-sweep --split out/toyworld-test --out docs/results/scheduler-sweep.json
    trainers scheduler-sweep --synthesis 48 --grid dpm++:15 unipc:10 --out docs/results/synthesis-sweep.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from factory.dataset.config import method_config
from factory.method.distiller import Distiller
from factory.method.loading import load_pipeline
from factory.method.schedulers import SCHEDULERS
from factory.method.settings import Concept, DistillConfig, SampleSpec
from factory.yaml_config import ConfigError
from trainers.evaluate.method_masks import load_pair, read_split
from trainers.evaluate.metrics import PooledSegmentationMetrics

DEFAULT_GRID = ["ddim:50", "ddim:25", "ddim:15", "ddim:10"] + [
    f"{s}:{k}" for s in ("dpm++", "unipc", "euler") for k in (25, 15, 10)
]


def parse_grid(grid: list[str]) -> list[tuple[str, int]]:
    """SCHEDULER:STEPS items -> (name, steps), each name checked against the registry (a UserError)."""
    out = []
    for g in grid:
        name, _, steps = g.partition(":")
        if not steps.isdigit() or int(steps) < 1:
            raise ConfigError(f"--grid takes SCHEDULER:STEPS items such as dpm++:15, got {g!r}")
        out.append((SCHEDULERS.check(name), int(steps)))
    return out


def sweep(
    split: str,
    grid: list[str],
    n: int | None = None,
    batch: int = 8,
    model: str = "toyworld",
    base: DistillConfig | None = None,
) -> dict:
    """`base`: the method's settings that every grid setting shares (the defaults, or `--set` in a job's
    keys); each setting replaces its Step-4 sampler and step count."""
    base_cfg = base or DistillConfig()
    settings = parse_grid(grid)
    pipe = load_pipeline(model)
    prober = Distiller(model, pipeline=pipe, config=base_cfg)  # Steps 1-2, shared by every setting
    variants = {
        (s, k): Distiller(
            model, pipeline=pipe, config=replace(base_cfg, inpaint_scheduler=s, inpaint_steps=k)
        )
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
        maps = prober.probe([p[0] for p in pairs], specs)  # Steps 1-2 once, Steps 3-6 per setting
        states = [g.get_state() for g in maps.generators]
        for key, d in variants.items():
            for g, st in zip(maps.generators, states, strict=True):
                g.set_state(st)
            t = time.perf_counter()
            triplets = [draft.finish() for draft in d.draft(maps)]
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


def synthesis_agreement(
    grid: list[str],
    n: int,
    model: str = "toyworld",
    guidance: float = 3.0,
    base: DistillConfig | None = None,
) -> dict:
    """Synthesis mode has no ground truth, so each SCHEDULER:STEPS setting (synthesis and inpainting alike,
    attention over the 80% least-noisy of its grid) is compared with the paper's DDIM 50 + 50 on the same
    seeds: DDIM, DPM-Solver++, UniPC and Euler all integrate the same probability-flow ODE from the same
    initial noise, so at enough steps they draw nearly the same image. Reported: the refined masks' IoU with
    the reference's (pixel-pooled) and the images' mean absolute difference (0-255)."""
    base = base or DistillConfig()
    parse_grid(grid)  # bad items fail before any model loads
    pipe = load_pipeline(model)
    concepts = ["circle", "square", "triangle", "star", "heart", "ring"]
    specs = [SampleSpec(Concept(concepts[i % len(concepts)]), seed=10_000 + i) for i in range(n)]

    def run(name: str, steps: int):
        cfg = replace(
            base,
            num_inference_steps=steps,
            probe_t0=max(1, round(0.8 * steps)),
            inpaint_steps=steps,
            guidance_scale=guidance,
            scheduler=name,
            inpaint_scheduler=name,
        )
        t = time.perf_counter()
        out = Distiller(model, pipeline=pipe, config=cfg).synthesize(specs)
        return out, time.perf_counter() - t

    Distiller(model, pipeline=pipe, config=DistillConfig(2, 1, inpaint_steps=2)).synthesize(
        specs[:1]
    )  # warm-up
    ref, ref_s = run("ddim", 50)
    rows = []
    for g in grid:
        name, steps = g.split(":")[0], int(g.split(":")[1])
        out, secs = run(name, steps)
        agree = PooledSegmentationMetrics()
        for a, b in zip(out, ref, strict=True):
            agree.update(a.mask, b.mask)
        rows.append(
            {
                "scheduler": name,
                "steps": steps,
                "mask_iou_vs_ddim50": agree.compute()["iou"],
                "image_mad_vs_ddim50": float(
                    np.mean(
                        [
                            np.abs(a.image.astype(int) - b.image.astype(int)).mean()
                            for a, b in zip(out, ref, strict=True)
                        ]
                    )
                ),
                "time_vs_ddim50": secs / ref_s,
            }
        )
    return {"n_samples": n, "guidance": guidance, "settings": rows}


def markdown_synthesis(res: dict) -> str:
    lines = [
        f"Synthesis mode, {res['n_samples']} samples (guidance {res['guidance']}), each setting against DDIM "
        "50 + 50 on the same seeds.",
        "",
        "| sampler (both loops) | steps | refined-mask IoU with DDIM 50's | image difference, 0-255 | time |",
        "|---|---|---|---|---|",
    ]
    for r in res["settings"]:
        lines.append(
            f"| {r['scheduler']} | {r['steps']} | {100 * r['mask_iou_vs_ddim50']:.1f} | "
            f"{r['image_mad_vs_ddim50']:.1f} | {r['time_vs_ddim50']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def markdown(res: dict) -> str:
    ref = next(
        (r for r in res["settings"] if (r["scheduler"], r["steps"]) == ("ddim", 50)), res["settings"][0]
    )
    name = f"{ref['scheduler'].replace('ddim', 'DDIM')} {ref['steps']}"
    lines = [
        f"Refined-mask IoU on {res['n_images']} images of `{res['split']}`; probe: {res['probe']}; "
        f"M_pre IoU {100 * res['prelim_iou']:.1f}.",
        "",
        f"| Step 4 sampler | steps | refined M IoU | vs {name} | inpainting time vs {name} |",
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
    p.add_argument("--split", help="the labelled split (label-mode sweep)")
    p.add_argument("--grid", nargs="+", default=DEFAULT_GRID, help="SCHEDULER:STEPS settings")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=None, help="write the results here as JSON (and .md beside it)")
    p.add_argument(
        "--synthesis",
        type=int,
        default=0,
        metavar="N",
        help="instead: N synthesized samples per setting against DDIM 50 + 50 on the same seeds",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="the settings every grid point shares, in a job config's keys (e.g. --set masks.edges=none)",
    )
    a = p.parse_args(argv)
    base = method_config(a.set)
    if a.synthesis:
        res = synthesis_agreement(a.grid, a.synthesis, base=base)
        print(markdown_synthesis(res))
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(res, indent=1))
            Path(a.out).with_suffix(".md").write_text(markdown_synthesis(res))
        return
    if not a.split:
        p.error("--split is required (or --synthesis N)")
    res = sweep(a.split, a.grid, a.n, a.batch, base=base)
    print(markdown(res))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
        Path(a.out).with_suffix(".md").write_text(markdown(res))


if __name__ == "__main__":
    main()
