"""What a job leaves for people to read: the summary it prints, report.md and report.png beside the shards,
and the contact sheets (image | attention | masks | ... rows) that the report and the evaluations draw."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from factory.dataset.config import JobConfig
    from factory.dataset.shards import ShardStore


def heatmap(values: np.ndarray) -> np.ndarray:
    """Min-max normalised map -> (H, W, 3) uint8 with a perceptual (viridis-like) colormap."""
    import cv2

    v = np.asarray(values, np.float32)
    v = (v - v.min()) / (np.ptp(v) + 1e-12)
    return cv2.applyColorMap((v * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)[..., ::-1].copy()


def as_rgb(tile: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Any tile (bool mask, float map, gray, RGB, RGBA) -> (h, w, 3) uint8 at `size` (nearest)."""
    t = np.asarray(tile)
    if t.dtype == bool:
        t = np.repeat((t[..., None] * 255).astype(np.uint8), 3, 2)
    elif t.ndim == 2 and t.dtype != np.uint8:
        t = heatmap(t)
    elif t.ndim == 2:
        t = np.repeat(t[..., None], 3, 2)
    elif t.shape[2] == 4:  # RGBA over a checkerboard
        yy, xx = np.mgrid[: t.shape[0], : t.shape[1]]
        checker = np.where(((yy // 4 + xx // 4) % 2)[..., None] == 0, 200, 140).astype(np.float32)
        a = t[..., 3:4].astype(np.float32) / 255
        t = (t[..., :3] * a + checker * (1 - a)).astype(np.uint8)
    if t.shape[:2] != size:
        t = np.asarray(Image.fromarray(t).resize((size[1], size[0]), Image.NEAREST))
    return t


def contact_sheet(
    rows: list[list[np.ndarray]], columns: list[str], tile: int = 128, row_labels: list[str] | None = None
) -> Image.Image:
    """A grid image: one row per sample, one labelled column per stage."""
    pad, head = 4, 18
    left = 0 if row_labels is None else 150
    w = left + len(columns) * (tile + pad) + pad
    h = head + len(rows) * (tile + pad) + pad
    sheet = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(columns):
        draw.text((left + pad + j * (tile + pad), 3), name, fill="black")
    for i, row in enumerate(rows):
        y = head + i * (tile + pad)
        if row_labels is not None:
            draw.text((4, y + tile // 2 - 6), row_labels[i][:24], fill="black")
        for j, t in enumerate(row):
            sheet.paste(Image.fromarray(as_rgb(t, (tile, tile))), (left + pad + j * (tile + pad), y))
    return sheet


# ----------------------------------------------------------------------------- the job's report


def summarize(stats: list[dict], manifest: dict, wall: float, store: ShardStore) -> dict:
    written = sum(s["written"] for s in stats)
    rejected: dict[str, int] = {}
    for s in stats:
        for k, v in s["rejected"].items():
            rejected[k] = rejected.get(k, 0) + v
    gen = sum(s["timings"]["generate_s"] for s in stats)
    enc = sum(s["timings"]["encode_write_s"] + s["timings"].get("assemble_s", 0.0) for s in stats)
    nodes = sorted({p["node"] for s in stats for p in s["parts"]})
    memory = [s["memory"] for s in stats]
    return {
        "output": store.public_uri,
        "shards_this_run": len(stats),
        "written_this_run": written,
        "rejected_this_run": rejected,
        "wall_s": wall,
        "samples_per_s": (written + sum(rejected.values())) / wall if wall else 0.0,
        "generate_s": gen,
        "encode_write_s": enc,
        "outside_model_share": enc / (gen + enc) if gen + enc else 0.0,
        "nodes": nodes,
        "call_bytes_max": max((m["call_bytes_max"] for m in memory), default=0),
        "actor_peak_rss_bytes": max((m["actor_peak_rss_bytes"] for m in memory), default=0),
        "total_written": manifest["totals"]["written"],
        "complete": manifest["complete"],
        "missing_shards": manifest["missing_shards"],
    }


def print_plan(cfg: JobConfig, mode: str, tasks: list, todo: list, store: ShardStore) -> dict:
    """`--dry-run`: what a run would do, printed and returned; nothing is started or written."""
    todo_names = {t.name for t in todo}
    plan = {
        "mode": mode,
        "output": store.public_uri,
        "shards_planned": len(tasks),
        "shards_committed": len(tasks) - len(todo),
        "shards_to_produce": len(todo),
        "samples_planned": sum(len(t) for t in tasks),
        "samples_to_produce": sum(len(t) for t in todo),
        "concepts": dict(
            zip(
                [c.name for c in cfg.concepts],
                np.sum([t.concept_counts(cfg) for t in todo], axis=0, dtype=int).tolist()
                if todo
                else [0] * len(cfg.concepts),
                strict=True,
            )
        ),
        "samples_per_call": cfg.samples_per_call(),
        "first_shards_to_produce": [t.name for t in tasks if t.name in todo_names][:5],
    }
    print(
        f"[factory] dry run, {mode}: {plan['shards_planned']} shards "
        f"({plan['samples_planned']} samples) planned "
        f"-> {plan['output']}; {plan['shards_committed']} already committed would be skipped; "
        f"{plan['shards_to_produce']} shards ({plan['samples_to_produce']} samples) would be produced"
    )
    for name, n in plan["concepts"].items():
        print(f"[factory]   {name}: {n} samples to produce")
    print(f"[factory] preflight passed: model {cfg.model!r}, prompts and output checked; nothing was started")
    return plan


def print_summary(s: dict) -> None:
    rej = ", ".join(f"{k}: {v}" for k, v in s["rejected_this_run"].items()) or "none"
    print(
        f"[factory] this run: {s['written_this_run']} samples written in {s['shards_this_run']} shards, "
        f"rejected {rej}; {s['samples_per_s']:.2f} samples/s over {s['wall_s']:.0f}s "
        f"on {len(s['nodes'])} node(s); "
        f"refine+encode+write took {100 * s['outside_model_share']:.1f}% of worker time"
    )
    state = "complete" if s["complete"] else f"INCOMPLETE, missing {s['missing_shards']}"
    print(
        f"[factory] output {s['output']}: {s['total_written']} samples in total, {state}; "
        f"manifest.json, report.png and report.md beside the shards"
    )


def write_report(store: ShardStore, cfg: JobConfig, manifest: dict, summary: dict) -> None:
    """report.png (a contact sheet of committed triplets) and report.md (stats), beside the shards."""
    from factory.dataset.shards import decode_sample

    rows, labels = [], []
    fmt = cfg.output.image_format
    per_shard = max(1, -(-cfg.output.report_samples // max(1, len(manifest["shards"]))))
    for shard in manifest["shards"]:  # a few samples from every shard, so every concept shows
        if len(rows) >= cfg.output.report_samples:
            break
        for sample in store.read_first(shard["name"], per_shard):
            if len(rows) >= cfg.output.report_samples:
                break
            img = decode_sample(sample)
            attn = img["attn.npy"].astype(np.float32)
            rows.append(
                [
                    img[fmt],
                    attn,
                    img["prelim.png"] > 127,
                    img["mask.png"] > 127,
                    img["fg.png"],
                    img[f"bg.{fmt}"],
                ]
            )
            labels.append(sample["__key__"])
    if rows:
        sheet = contact_sheet(
            rows, ["image", "attention", "M_pre", "refined M", "foreground", "background"], row_labels=labels
        )
        with store.committing("report.png") as f:
            sheet.save(f, format="PNG")
    t = manifest["totals"]
    md = [
        f"# Concept Factory report: {store.public_uri}",
        "",
        f"- shards: {len(manifest['shards'])} of {manifest['expected_shards']} "
        f"({'complete' if manifest['complete'] else 'incomplete'})",
        f"- samples written: {t['written']}; rejected: {json.dumps(t['rejected'])}",
        f"- this run: {summary['samples_per_s']:.2f} samples/s, refine+encode+write share "
        f"{100 * summary['outside_model_share']:.1f}%, nodes {len(summary['nodes'])}",
        f"- model `{cfg.model}`, concepts {', '.join(c.name for c in cfg.concepts)}",
        "",
        "| shard | written | rejected |",
        "|---|---|---|",
    ]
    md += [f"| {s['name']} | {s['written']} | {json.dumps(s['rejected'])} |" for s in manifest["shards"]]
    md += ["", "![triplets](report.png)", ""]
    with store.committing("report.md", "w") as f:
        f.write("\n".join(md))
