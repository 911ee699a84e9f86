"""A trained student's export (state dicts, TorchScript, student.json) and loading it back."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainers.students.config import StudentsConfig
from trainers.students.model import build_student


def export_student(
    cfg: StudentsConfig, result, out: Path, concept: str | None, classes: list[str] | None
) -> None:
    """best.pt / last.pt state dicts, best.ts / last.ts TorchScript, student.json (how to rebuild it)."""
    import warnings

    out.mkdir(parents=True, exist_ok=True)
    # the best checkpoint's best.pt is in the newest checkpoint that holds one
    best_dir = None
    for ckpt, _ in sorted(result.best_checkpoints, key=lambda cm: cm[1].get("step", 0)):
        with ckpt.as_directory() as d:
            if (Path(d) / "best.pt").exists():
                best_dir = ckpt
    with result.checkpoint.as_directory() as d:
        last = torch.load(Path(d) / "last.pt", map_location="cpu", weights_only=True)
        history = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)["history"]
    best = last
    if best_dir is not None:
        with best_dir.as_directory() as d:
            best = torch.load(Path(d) / "best.pt", map_location="cpu", weights_only=True)
    n_classes = len(classes) + 1 if classes else 1
    info = {
        "backbone": cfg.model.backbone,
        "decoder": cfg.model.decoder,
        "decoder_kwargs": cfg.model.decoder_kwargs,
        "resolution": cfg.model.resolution,
        "classes": n_classes,
        "concept": concept,
        "class_names": ["background", *classes] if classes else None,
        "target": cfg.data.target,
        "steps": cfg.train.steps,
        "history": history,
    }
    x = torch.zeros(1, 3, cfg.model.resolution, cfg.model.resolution)
    for tag, state in (("best", best), ("last", last)):
        torch.save(state, out / f"{tag}.pt")
        model = build_student(
            cfg.model.backbone, n_classes, cfg.model.decoder, decoder_kwargs=cfg.model.decoder_kwargs
        ).eval()
        model.load_state_dict(state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.trace(model, x).save(str(out / f"{tag}.ts"))
    (out / "student.json").write_text(json.dumps(info, indent=1))


def load_student(path: str | Path, which: str = "best"):
    """A student exported by `trainers students`: (model in eval mode, its student.json)."""
    d = Path(path)
    info_file = d / "student.json"
    if not info_file.exists():
        raise FileNotFoundError(
            f"{d} is not an exported student (no student.json); point at one of "
            "`trainers students`' output folders"
        )
    info = json.loads(info_file.read_text())
    model = build_student(
        info["backbone"], info["classes"], info["decoder"], decoder_kwargs=info.get("decoder_kwargs")
    ).eval()
    model.load_state_dict(torch.load(d / f"{which}.pt", map_location="cpu", weights_only=True))
    return model, info
