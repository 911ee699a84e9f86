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


def boundary_band(target: torch.Tensor, width: int) -> torch.Tensor:
    """(B, S, S) True within `width` pixels of the label's boundary, on either side: where the label's
    dilation and erosion by a (2 width + 1) square differ. Foreground: target >= 0.5 (binary), > 0 (class
    indices)."""
    fg = (target >= 0.5 if target.is_floating_point() else target > 0).float()[:, None]
    k = 2 * width + 1
    dilated = F.max_pool2d(fg, k, stride=1, padding=width)
    eroded = -F.max_pool2d(-fg, k, stride=1, padding=width)
    return (dilated != eroded)[:, 0]


def student_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    kind: str = "bce",
    multiclass: bool = False,
    ignore_band: int = 0,
) -> torch.Tensor:
    """BCE [+ Dice] of a binary student, softmax cross-entropy of a multi-class one. `ignore_band`: the
    pixels within that many of the label's boundary count for nothing (the pseudo-label's uncertain band,
    as Dataset Diffusion ignores the pixels between its two thresholds); the loss is the mean over the
    rest."""
    keep = ~boundary_band(target, ignore_band) if ignore_band else None
    if multiclass:
        labels = target.long()
        if keep is not None:
            labels = labels.masked_fill(~keep, -100)
        return F.cross_entropy(logits, labels, ignore_index=-100)
    logits = logits[:, 0]
    weight = keep.float() if keep is not None else torch.ones_like(target)
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")
    loss = bce / weight.sum().clamp(min=1.0)
    if kind == "bce+dice":
        p = torch.sigmoid(logits) * weight
        t = target * weight
        inter = (p * t).flatten(1).sum(1)
        dice = 1 - (2 * inter + 1) / (p.flatten(1).sum(1) + t.flatten(1).sum(1) + 1)
        loss = loss + dice.mean()
    return loss


def predict_masks(model, images: torch.Tensor, multiclass: bool = False) -> torch.Tensor:
    """(B, 3, S, S) in [-1, 1] -> (B, S, S) foreground (binary: p >= 0.5; multi-class: argmax > 0)."""
    with torch.no_grad():
        logits = model(images)
    return logits.argmax(1) > 0 if multiclass else torch.sigmoid(logits[:, 0]) >= 0.5


def unwrap(model):
    return model.module if hasattr(model, "module") else model
