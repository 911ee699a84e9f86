"""Evaluate a student, or any mask source, on a labelled set, as the paper does.

    trainers evaluate --split out/tw-test --student out/students/star --out out/eval-star
    trainers evaluate --split CUB_200_2011 --masks preds/ --per-image
    trainers evaluate --split out/tw-test --grabcut --concept star
    trainers evaluate --split dogs/ --student out/students/dog --bbox   (box-only sets: Dogs, Cars, Human3.6M)

Labelled sets: a folder with images/ and masks/ (or CUB's segmentations/), matched by relative path without
extension (`factory toyworld-split` writes images/, masks/ and captions.jsonl; with captions, `--concept`
keeps that concept's images). Box-only sets give boxes.jsonl ({"file": ..., "box": [x0, y0, x1, y1]}).

Mask sources: an exported student (`--student`, best or `--which last`), a folder of predicted masks
(`--masks`, same relative names, any image format, foreground > 127) or OpenCV GrabCut with a centred box
(`--grabcut`, the paper's baseline).

Protocol (method.md Step 6 "Test"): image and GT are resized (shorter side, bilinear) to the resolution and
centre-cropped (128 in the paper; a student's own resolution); a GT pixel counts as foreground when its
resized value is > 0, as in the paper's CUB code; predictions are thresholded at 0.5 with no
post-processing. ACC / foreground IoU / mIoU are pooled over all pixels (the paper's numbers);
`--per-image` adds per-image means. `--bbox` scores the box around the predicted foreground against the GT
box (IoU, mean over images). A contact sheet of the worst and best images is written with `--out`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from factory.dataset.sources import IMAGE_EXTENSIONS
from factory.errors import UserError
from trainers.evaluate.metrics import PooledSegmentationMetrics
from trainers.students.data import center_crop, resize_shorter, to_tensor


def grabcut_mask(image: np.ndarray, margin: float = 0.1, iters: int = 5) -> np.ndarray:
    """OpenCV GrabCut initialised with a centred box (`margin` of the side on every edge)."""
    import cv2

    h, w = image.shape[:2]
    rect = (int(w * margin), int(h * margin), int(w * (1 - 2 * margin)), int(h * (1 - 2 * margin)))
    mask = np.zeros((h, w), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)
    cv2.grabCut(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), mask, rect, bgd, fgd, iters, cv2.GC_INIT_WITH_RECT)
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


def labelled_set(split: str | Path, concept: str | None = None) -> list[dict]:
    """Rows {"image": path, "mask": path or None, "box": [..] or None, "concept": ...} of a labelled
    folder."""
    root = Path(split)
    images = root / "images"
    masks = next((root / d for d in ("masks", "segmentations") if (root / d).is_dir()), None)
    if not images.is_dir():
        raise FileNotFoundError(
            f"{root} has no images/ folder (expected images/ with masks/ or segmentations/)"
        )
    concepts = {}
    if (root / "captions.jsonl").exists():
        for line in (root / "captions.jsonl").read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                concepts[Path(r["file"]).with_suffix("").as_posix()] = r.get("concept")
    boxes = {}
    if (root / "boxes.jsonl").exists():
        for line in (root / "boxes.jsonl").read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                boxes[Path(r["file"]).with_suffix("").as_posix()] = r["box"]
    mask_files = {}
    if masks is not None:
        mask_files = {
            p.relative_to(masks).with_suffix("").as_posix(): p
            for p in masks.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS
        }
    rows = []
    for p in sorted(q for q in images.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS):
        rel = p.relative_to(images).with_suffix("").as_posix()
        c = concepts.get(rel)
        if concepts and c is None:
            continue  # an image without the object (toyworld's background-only renders)
        if concept is not None and concepts and c != concept:
            continue
        if rel not in mask_files and rel not in boxes:
            continue
        rows.append({"id": rel, "image": p, "mask": mask_files.get(rel), "box": boxes.get(rel), "concept": c})
    if not rows:
        raise FileNotFoundError(
            f"no labelled images in {root}" + (f" for concept {concept!r}" if concept else "")
        )
    return rows


def prepare(array: np.ndarray, size: int, binary_gt: bool = False) -> np.ndarray:
    """The paper's test geometry: resize the shorter side (bilinear), centre-crop. Masks come back as bool:
    GT > 0 (the paper's CUB rule), predictions >= 0.5."""
    if array.ndim == 3:
        return center_crop(resize_shorter(to_tensor(array), size), size)
    m = torch.from_numpy(np.asarray(array, np.float32))[None]
    m = center_crop(resize_shorter(m, size), size)[0].numpy()
    return m > 0 if binary_gt else m >= 0.5


def box_of(mask: np.ndarray) -> list[int] | None:
    rows, cols = np.nonzero(mask)
    if not len(rows):
        return None
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


def box_iou(a, b) -> float:
    if a is None or b is None:
        return float(a is None and b is None)
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def evaluate(
    rows: list[dict],
    predict,
    size: int,
    bbox: bool = False,
    out: str | Path | None = None,
    sheet: int = 6,
    name: str = "masks",
) -> dict:
    """Score `predict(row, image uint8, prepared image tensor) -> (size, size) bool` on `rows`."""
    metrics = PooledSegmentationMetrics()
    box_ious, cases = [], []
    for r in rows:
        image = np.asarray(Image.open(r["image"]).convert("RGB"))
        x = prepare(image, size)
        pred = np.asarray(predict(r, image, x), bool)
        if pred.shape != (size, size):
            raise ValueError(f"the mask source gave {pred.shape} for {r['id']}, expected {(size, size)}")
        if r["mask"] is not None:
            gt = prepare(np.asarray(Image.open(r["mask"]).convert("L")) > 127, size, binary_gt=True)
            metrics.update(pred, gt)
            score = metrics.per_image_iou[-1]
        else:
            gt = None
        if bbox:
            h, w = image.shape[:2]
            if r["box"] is not None:  # boxes are in original pixels: map them through resize + crop
                s = size / min(h, w)
                dy, dx = (round(h * s) - size) // 2, (round(w * s) - size) // 2
                gbox = [
                    r["box"][0] * s - dx,
                    r["box"][1] * s - dy,
                    r["box"][2] * s - dx,
                    r["box"][3] * s - dy,
                ]
            else:
                gbox = box_of(gt)
            score = box_iou(box_of(pred), gbox)
            box_ious.append(score)
        cases.append(
            (score, r["id"], ((x.numpy().transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8), pred, gt)
        )
    res = {"source": name, "n_images": len(rows), "resolution": size}
    if metrics.per_image_iou:
        res.update(metrics.compute())
    if bbox:
        res["box_iou"] = float(np.mean(box_ious))
    if out:
        from factory.dataset.report import contact_sheet

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        ordered = sorted(cases, key=lambda c: c[0])
        picks = ordered[:sheet] + ordered[-sheet:] if len(ordered) > 2 * sheet else ordered
        tiles = [[img, pred, gt if gt is not None else np.zeros_like(pred)] for _, _, img, pred, gt in picks]
        labels = [
            f"{'worst' if i < min(sheet, len(picks) // 2) else 'best'} {s:.2f} {rid}"
            for i, (s, rid, *_rest) in enumerate(picks)
        ]
        contact_sheet(tiles, ["image", "prediction", "ground truth"], row_labels=labels).save(
            out / "cases.png"
        )
        (out / "metrics.json").write_text(json.dumps(res, indent=1))
    return res


def student_predictor(path: str | Path, which: str = "best"):
    from trainers.students.export import load_student
    from trainers.students.model import predict_masks

    model, info = load_student(path, which)
    multiclass = info["classes"] > 1

    def predict(row, image, x):
        return predict_masks(model, x[None], multiclass)[0].numpy()

    return predict, info


def folder_predictor(folder: str | Path, rows: list[dict], size: int):
    """Predicted masks read from a folder with the images' relative names (foreground > 127)."""
    folder = Path(folder)
    index = {
        q.relative_to(folder).with_suffix("").as_posix(): q
        for q in folder.rglob("*")
        if q.suffix.lower() in IMAGE_EXTENSIONS
    }
    missing = [r["id"] for r in rows if r["id"] not in index]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} images have no predicted mask in {folder}, e.g. {missing[0]!r}"
        )

    def predict(row, image, x):
        return prepare(np.asarray(Image.open(index[row["id"]]).convert("L")) > 127, size)

    return predict


def grabcut_predictor(size: int):
    def predict(row, image, x):
        return prepare(grabcut_mask(image), size)

    return predict


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="trainers evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--split", required=True, help="labelled folder: images/ + masks/ (or segmentations/, boxes.jsonl)"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--student", help="an exported student folder (trainers students)")
    src.add_argument("--masks", help="a folder of predicted masks with the images' relative names")
    src.add_argument("--grabcut", action="store_true", help="OpenCV GrabCut with a centred box")
    p.add_argument("--which", default="best", choices=["best", "last"])
    p.add_argument("--concept", default=None, help="only this concept's images (sets with captions.jsonl)")
    p.add_argument(
        "--resolution", type=int, default=None, help="evaluation size (default: the student's, else 128)"
    )
    p.add_argument("--bbox", action="store_true", help="bounding-box IoU (box-only sets)")
    p.add_argument("--per-image", action="store_true", help="also print per-image mean IoU")
    p.add_argument("--out", default=None, help="write metrics.json and cases.png (worst and best) here")
    a = p.parse_args(argv)
    rows = labelled_set(a.split, a.concept)
    size = a.resolution or 128
    if a.student:
        predict, info = student_predictor(a.student, a.which)
        size = a.resolution or info["resolution"]
        name = f"student {Path(a.student).name} ({info['backbone']}, {a.which})"
    elif a.grabcut:
        predict, name = grabcut_predictor(size), "GrabCut"
    else:
        try:
            predict = folder_predictor(a.masks, rows, size)
        except FileNotFoundError as err:
            raise UserError(str(err)) from None
        name = f"masks {a.masks}"
    res = evaluate(rows, predict, size, a.bbox, a.out, name=name)
    print(f"{name} on {res['n_images']} images at {size}x{size}:")
    if "acc" in res:
        print(
            f"  ACC {100 * res['acc']:.1f}  IoU {100 * res['iou']:.1f}  mIoU {100 * res['miou']:.1f}"
            "  (pixel-pooled)"
        )
        if a.per_image:
            print(f"  per-image mean IoU {100 * res['per_image_iou']:.1f}")
    if a.bbox:
        print(f"  box IoU {100 * res['box_iou']:.1f} (mean over images)")
    return 0
