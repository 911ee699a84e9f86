"""In-loop attention versus the Step-1 probe on synthesized images (issue: synthesis without a probe pass).

For each synthesized toyworld sample, the concept attention recorded inside the denoising loop is compared
with the paper's probe run afterwards on the generated latents (40 least-noisy of 50 steps, fresh noise):
the pixel AUC-ROC of the in-loop map against the probe's GMM mask, and the IoU between the two GMM masks.

    python -m trainers.toyworld.compare_attention --model toyworld --n 60
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np

from factory.method.distiller import Distiller
from factory.method.settings import Concept, DistillConfig, SampleSpec
from factory.toyworld.world import CONCEPTS
from trainers.evaluate.metrics import PooledSegmentationMetrics, pixel_auc


def compare(model: str, n: int, guidance: float, seed0: int = 0) -> dict:
    base = DistillConfig(guidance_scale=guidance, inpaint_steps=1)
    loop = Distiller(model, config=base)
    probe = Distiller(model, config=dataclasses.replace(base, attention="probe"), pipeline=loop.pipe)
    specs = [SampleSpec(Concept(CONCEPTS[i % len(CONCEPTS)]), seed=seed0 + i) for i in range(n)]
    a, b = loop.synthesize(specs), probe.synthesize(specs)
    maps, refs = [], []
    iou = PooledSegmentationMetrics()
    for ta, tb in zip(a, b, strict=True):
        assert np.array_equal(ta.image, tb.image)
        if tb.prelim.all() or not tb.prelim.any():
            continue
        maps.append(ta.attention.astype(np.float32))
        refs.append(tb.prelim)
        iou.update(ta.prelim, tb.prelim)
    return {
        "n": len(maps),
        "guidance_scale": guidance,
        "auc_loop_vs_probe_mask": pixel_auc(maps, refs),
        "prelim_agreement": iou.compute(),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m trainers.toyworld.compare_attention",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="toyworld")
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--guidance", type=float, default=3.0)
    a = p.parse_args(argv)
    print(json.dumps(compare(a.model, a.n, a.guidance), indent=2))


if __name__ == "__main__":
    main()
