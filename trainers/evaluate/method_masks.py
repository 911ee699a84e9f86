"""Evaluate the method's masks against ground truth on a labelled split (paper Table 2, first rows).

The split is a folder with images/, masks/ (0/255 PNG) and captions.jsonl (one row per image with `file`
and `concept`; `factory.toyworld.world.write_split` writes this layout). Only the image-level concept name
is used to label; the masks are read only to score. Images without an object (concept null) are skipped:
the method assumes every image contains the concept, as the paper does.

Reports pixel-pooled ACC / foreground IoU / mIoU for the preliminary masks M_pre (nearest-upsampled to
image size) and the refined masks M, the pixel AUC-ROC of the mean attention maps, and writes a contact
sheet image | attention | M_pre | inpainted background | M | GT. It also measures whether the background
inpainting removed the object: the share of GT object pixels whose colour changed by more than 10 % of the
range, and the fraction of images where under half of the object was removed ("the object survives").

    trainers evaluate-masks --split out/toyworld-test --model toyworld --out out/eval-base
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from factory.dataset.config import method_config
from factory.dataset.report import contact_sheet
from factory.method.distiller import Distiller, draft_each
from factory.method.edges import snap_to_edges
from factory.method.geometry import resize_mask
from factory.method.settings import Concept, SampleSpec
from trainers.evaluate.metrics import PooledSegmentationMetrics, pixel_auc

# A GT object pixel counts as removed by the inpainting when its mean RGB change exceeds 10 % of the range; an
# image "keeps the object" when fewer than half of its object pixels were removed.
OBJECT_CHANGE_THRESHOLD = 0.1


def read_split(split: str | Path, n: int | None = None) -> list[dict]:
    split = Path(split)
    index = split / "captions.jsonl"
    if not index.exists():
        raise FileNotFoundError(
            f"{index} not found: a labelled split needs images/, masks/ and captions.jsonl "
            "(write one with `factory toyworld-split`)"
        )
    rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("concept")]
    return rows[:n] if n else rows


def load_pair(split: Path, row: dict) -> tuple[np.ndarray, np.ndarray]:
    img = np.asarray(Image.open(split / "images" / row["file"]).convert("RGB"))
    gt = np.asarray(Image.open(split / "masks" / row["file"]).convert("L")) > 127
    return img, gt


class _Scores:
    """One distiller's running scores over a split: M_pre, refined M (and, with edges: guided, M_pre
    snapped and refined M by the paper's rule from the same drafts), the attention maps for the AUC, how
    much of each object the background inpainting removed, and the contact sheet's rows."""

    def __init__(self, distiller: Distiller, sheet_rows: int):
        self.d, self.sheet_rows = distiller, sheet_rows
        self.prelim, self.refined = PooledSegmentationMetrics(), PooledSegmentationMetrics()
        # with edges: guided, also what the same edge snapping makes of M_pre (the shards keep M_pre on the
        # grid), and the refined masks by the paper's rule from the same drafts (the same M_pre and
        # backgrounds)
        guided = distiller.config.edges == "guided"
        self.snapped = PooledSegmentationMetrics() if guided else None
        self.paper = PooledSegmentationMetrics() if guided else None
        self.maps, self.gts, self.sheet, self.changed = [], [], [], []

    def update(self, img: np.ndarray, gt: np.ndarray, draft) -> None:
        d = self.d
        tr = draft.finish()
        c = tr.meta["canvas"]
        f = d.vae_factor
        lat_h, lat_w = -(-c["valid_h"] // f), -(-c["valid_w"] // f)
        prelim = resize_mask(tr.prelim[:lat_h, :lat_w], *gt.shape)
        att = np.asarray(tr.attention[:lat_h, :lat_w], np.float32)
        att_up = np.asarray(Image.fromarray(att).resize((gt.shape[1], gt.shape[0]), Image.NEAREST))
        self.prelim.update(prelim, gt)
        if self.snapped is not None:
            snapped = snap_to_edges(tr.prelim[:lat_h, :lat_w], img, d.edge_radius_px, d.config.edge_eps)
            self.snapped.update(snapped, gt)
        self.refined.update(tr.mask, gt)
        if self.paper is not None:
            self.paper.update(draft.finish(dataclasses.replace(draft.settings, edges="none")).mask, gt)
        self.maps.append(att_up)
        self.gts.append(gt)
        if gt.any():  # how much of the object did the background inpainting remove?
            change = np.abs(img.astype(np.float32) - tr.background.astype(np.float32)).mean(-1) / 255.0
            self.changed.append(float((change[gt] > OBJECT_CHANGE_THRESHOLD).mean()))
        if len(self.sheet) < self.sheet_rows:
            self.sheet.append([img, att_up, prelim, tr.background, tr.mask, gt])

    def result(self, n_images: int, seconds: float, out: str | Path | None) -> dict:
        d, changed = self.d, self.changed
        res = {
            "n_images": n_images,
            "attention_auc": pixel_auc(self.maps, self.gts),
            "prelim": self.prelim.compute(),
            "inpaint_model": d.inpaint_model,
            "refined": self.refined.compute(),
            "seconds": seconds,
            "model": d.model,
            "object_changed_mean": float(np.mean(changed)) if changed else float("nan"),
            "object_kept_fraction": float(np.mean(np.array(changed) < 0.5)) if changed else float("nan"),
            "config": d.config_dict(),
        }
        if self.snapped is not None:
            res["prelim_edges"] = self.snapped.compute()
        if self.paper is not None:  # every image scored by both rules: the same images, so the rows compare
            res["refined_paper"] = self.paper.compute()
        if out:
            out = Path(out)
            out.mkdir(parents=True, exist_ok=True)
            contact_sheet(self.sheet, ["image", "attention", "M_pre", "background", "refined M", "GT"]).save(
                out / "contact_sheet.png"
            )
            (out / "metrics.json").write_text(json.dumps(res, indent=2))
            (out / "metrics.md").write_text(markdown_table(res))
        return res


def evaluate_distillers(
    distillers: list[Distiller],
    split: str | Path,
    n: int | None = None,
    batch: int = 16,
    outs: list[str | Path | None] | None = None,
    sheet_rows: int = 12,
) -> list[dict]:
    """Score several distillers that share Steps 1-2 (the same model and settings; their inpainting models
    differ, m and m', say) on one split, probing each image once: the first distiller's probe is drafted
    by each (`draft_each`: from the same noise, so each result is what its own evaluation gives). One
    result per distiller (`evaluate_distiller`'s), each written to its folder in `outs`."""
    first = distillers[0]
    for d in distillers[1:]:
        if d.model != first.model or d.config_dict() != first.config_dict():
            raise ValueError("evaluate_distillers shares one probe: the distillers need one model and config")
    split = Path(split)
    rows = read_split(split, n)
    scores = [_Scores(d, sheet_rows) for d in distillers]
    t0 = time.time()
    for i in tqdm(range(0, len(rows), batch), desc="label+score", mininterval=5):
        chunk = rows[i : i + batch]
        pairs = [load_pair(split, r) for r in chunk]
        specs = [
            SampleSpec(Concept(r["concept"]), s, f"{r['concept']}-{s:010d}")
            for s, r in ((int(r.get("seed", i + j)), r) for j, r in enumerate(chunk))
        ]
        first.token_weights(specs)  # every prompt checked before any model work
        mb = first.batch_size(len(specs))
        for j in range(0, len(specs), mb):
            maps = first.probe([p[0] for p in pairs[j : j + mb]], specs[j : j + mb])
            for score, drafts in zip(scores, draft_each(maps, distillers), strict=True):
                for (img, gt), draft in zip(pairs[j : j + mb], drafts, strict=True):
                    score.update(img, gt, draft)
    seconds = time.time() - t0
    outs = outs or [None] * len(distillers)
    return [s.result(len(rows), seconds, o) for s, o in zip(scores, outs, strict=True)]


def evaluate_distiller(
    distiller: Distiller,
    split: str | Path,
    n: int | None = None,
    batch: int = 16,
    out: str | Path | None = None,
    sheet_rows: int = 12,
) -> dict:
    """The method's masks of `distiller` against the split's ground truth (the module's docstring)."""
    return evaluate_distillers([distiller], split, n, batch, [out], sheet_rows)[0]


def markdown_table(res: dict) -> str:
    inp = f", inpainting with `{res['inpaint_model']}`" if res.get("inpaint_model") else ""
    lines = [
        f"Mask quality on {res['n_images']} held-out images (model `{res['model']}`{inp}); pixel-pooled.",
        "",
        f"Mean attention map AUC-ROC: {res['attention_auc']:.3f}",
        "",
        f"Background inpainting: {100 * res['object_changed_mean']:.1f}% of GT object pixels removed on "
        f"average; the object survives (under half removed) in {100 * res['object_kept_fraction']:.1f}% "
        "of images.",
        "",
        "| stage | ACC | IoU | mIoU |",
        "|---|---|---|---|",
    ]
    rows = [("preliminary masks M_pre", "prelim"), ("M_pre, edges snapped", "prelim_edges")]
    rows.append(("refined masks M, the paper's rule (edges: none)", "refined_paper"))
    rows.append(("refined masks M" + (", edges snapped" if "prelim_edges" in res else ""), "refined"))
    for name, key in rows:
        if key not in res:
            continue
        m = res[key]
        lines.append(f"| {name} | {100 * m['acc']:.1f} | {100 * m['iou']:.1f} | {100 * m['miou']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="trainers evaluate-masks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--split", required=True)
    p.add_argument(
        "--model", default="toyworld", help="m: attention (Steps 1-2), and inpainting unless --inpaint-model"
    )
    p.add_argument(
        "--inpaint-model", default=None, help="m' for the background inpainting (trainers finetune's export)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default=None)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="the method's settings in a job config's keys, e.g. --set masks.edges=none "
        "--set masks.rule=otsu (the sampler, masks and inpaint sections)",
    )
    a = p.parse_args(argv)
    cfg = method_config(a.set)
    res = evaluate_distiller(
        Distiller(a.model, a.device, config=cfg, inpaint_model=a.inpaint_model), a.split, a.n, a.batch, a.out
    )
    print(markdown_table(res))


if __name__ == "__main__":
    main()
