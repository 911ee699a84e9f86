"""The quality filters: which written samples are rejected, and why (`filters:` in the job config)."""

from __future__ import annotations

from factory.dataset.config import JobConfig


def reject_reason(meta: dict, cfg: JobConfig) -> str | None:
    """The quality filters: None if the sample is good, else the reason it is rejected."""
    f = cfg.filters
    if meta.get("attention_finite") is False:  # a NaN or inf in the concept map (fp16 overflow, say)
        return "nonfinite_attention"
    area = meta["mask_area"]
    if area == 0.0:
        return "empty_mask"
    if area >= 0.999:
        return "full_mask"
    if area < f.min_area:
        return "area_below_min"
    if area > f.max_area:
        return "area_above_max"
    if meta["prelim_stats"]["bimodality"] < f.min_bimodality:
        return "low_bimodality"
    if f.reject_edgeless and meta.get("edges") == "unsnapped":
        return "edgeless_mask"
    return None
