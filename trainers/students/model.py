"""The student: a segmentation_models_pytorch decoder on a timm backbone, its loss and its prediction."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


class PretrainedWeightsError(RuntimeError):
    """Backbone weights were asked for but are not available offline."""


def build_student(
    backbone: str,
    classes: int = 1,
    decoder: str = "Unet",
    pretrained: str | None = None,
    decoder_kwargs: dict | None = None,
):
    """A segmentation_models_pytorch `decoder` on the timm `backbone` (smp's `tu-<name>` universal encoder).

    `pretrained` is a local file (a timm checkpoint of the backbone: .safetensors, .pth, .bin); weights are
    never downloaded."""
    import segmentation_models_pytorch as smp
    import timm

    if not timm.is_model(backbone):
        close = timm.list_models(f"*{backbone.split('_')[0]}*")[:8]
        raise ValueError(
            f"unknown timm backbone {backbone!r}" + (f"; similar names: {', '.join(close)}" if close else "")
        )
    arch = getattr(smp, decoder, None)
    if arch is None or not isinstance(arch, type):
        raise ValueError(
            f"unknown segmentation_models_pytorch architecture {decoder!r} (e.g. Unet, FPN, DeepLabV3Plus)"
        )
    model = arch(
        encoder_name=f"tu-{backbone}", encoder_weights=None, classes=classes, **(decoder_kwargs or {})
    )
    if pretrained:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise PretrainedWeightsError(
                f"pretrained backbone weights {str(path)!r} not found. Weights are never downloaded here: "
                f"download the timm checkpoint of {backbone!r} where the hub is reachable and give its local "
                "path, or set "
                "model.pretrained: null to train from scratch."
            )
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        encoder = model.encoder.model
        own = encoder.state_dict()
        matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if len(matched) < 0.5 * len(own):
            raise PretrainedWeightsError(
                f"{path} matches only {len(matched)} of {len(own)} tensors of the "
                f"{backbone!r} encoder: is it a checkpoint of that backbone?"
            )
        encoder.load_state_dict(matched, strict=False)
    return model


def student_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "bce", multiclass: bool = False):
    if multiclass:
        return F.cross_entropy(logits, target.long())
    logits = logits[:, 0]
    loss = F.binary_cross_entropy_with_logits(logits, target)
    if kind == "bce+dice":
        p = torch.sigmoid(logits)
        inter = (p * target).flatten(1).sum(1)
        dice = 1 - (2 * inter + 1) / (p.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
        loss = loss + dice.mean()
    return loss


def predict_masks(model, images: torch.Tensor, multiclass: bool = False) -> torch.Tensor:
    """(B, 3, S, S) in [-1, 1] -> (B, S, S) foreground (binary: p >= 0.5; multi-class: argmax > 0)."""
    with torch.no_grad():
        logits = model(images)
    return logits.argmax(1) > 0 if multiclass else torch.sigmoid(logits[:, 0]) >= 0.5


def unwrap(model):
    return model.module if hasattr(model, "module") else model
