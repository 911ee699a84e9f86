"""Concept-map readouts side by side: attention AUC, M_pre and refined M per readout, layer window and step
window, on a labelled split, one model loaded once.

Each setting is a list of a job config's `--set` items joined by ";" (the `sampler`, `masks` and `inpaint`
sections), applied over `--set` (shared by every setting); every setting runs the whole label path
(`trainers evaluate-masks` per setting) on the same images and seeds. Refined M is scored by the default rule
(edges snapped) and by the paper's (`refined_paper`).

    factory toyworld-split --out out/dev --seeds 3100000000:3100000150
    trainers readout-sweep --model toyworld-dit --split out/dev --out out/readouts-dev \\
        --grid "sampler.readout=image_to_text" "sampler.readout=concept_output"
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from factory.dataset.config import method_config
from factory.method.distiller import Distiller
from factory.method.loading import load_pipeline
from trainers.evaluate.method_masks import evaluate_distiller

DEFAULT_GRID = ["sampler.readout=image_to_text", "sampler.readout=concept_output"]


def sweep(
    model: str, split: str, grid: list[str], shared: list[str], n: int | None = None, batch: int = 16
) -> list[dict]:
    """One `evaluate_distiller` result per setting, with the setting's `--set` items under "setting"."""
    pipe = load_pipeline(model)
    # every setting checked before any model work; `batch` samples per model call (a sample depends on its
    # seed, not on its batch: the same masks as one at a time, faster on the CPU)
    configs = [
        replace(method_config([*shared, *[s for s in g.split(";") if s]]), micro_batch=batch) for g in grid
    ]
    rows = []
    for g, cfg in zip(grid, configs, strict=True):
        t0 = time.time()
        res = evaluate_distiller(Distiller(model, pipeline=pipe, config=cfg), split, n, batch)
        res["setting"] = g
        rows.append(res)
        print(
            f"{g}: AUC {res['attention_auc']:.3f}, M_pre IoU {100 * res['prelim']['iou']:.1f}, refined IoU "
            f"{100 * res['refined']['iou']:.1f} ({time.time() - t0:.0f} s)",
            flush=True,
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| setting | attention AUC | M_pre ACC / IoU / mIoU | refined M (default) ACC / IoU / mIoU "
        "| refined M (paper rule) ACC / IoU / mIoU |",
        "|---|---|---|---|---|",
    ]

    def three(m):
        return f"{100 * m['acc']:.1f} / {100 * m['iou']:.1f} / {100 * m['miou']:.1f}" if m else "-"

    for r in rows:
        lines.append(
            f"| `{r['setting']}` | {r['attention_auc']:.3f} | {three(r['prelim'])} | {three(r['refined'])} "
            f"| {three(r.get('refined_paper'))} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="trainers readout-sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="toyworld-dit")
    p.add_argument("--split", required=True)
    p.add_argument("--out", required=True, help="a folder: sweep.json and sweep.md")
    p.add_argument("--grid", nargs="+", default=DEFAULT_GRID, help='settings, e.g. "sampler.probe_t0=20"')
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="shared by every setting")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--batch", type=int, default=16)
    a = p.parse_args(argv)
    rows = sweep(a.model, a.split, a.grid, a.set, a.n, a.batch)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"model": a.model, "split": a.split, "rows": rows}, indent=2))
    (out / "sweep.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
