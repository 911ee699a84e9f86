"""`factory`: the Concept Factory command line.

    factory demo [--out out/demo] [--n 24]      run the method on the embedded toyworld model (CPU)
    factory toyworld-split --out DIR --seeds 0:200   write a labelled toyworld split (images, masks, captions)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _seeds(text: str) -> range:
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must look like START:STOP, got {text!r}") from None
    if b <= a:
        raise argparse.ArgumentTypeError(f"empty seed range {text!r}")
    return range(a, b)


def cmd_toyworld_split(a) -> int:
    from factory.toyworld.world import write_split

    out = write_split(a.out, a.seeds, a.size)
    print(f"wrote {len(a.seeds)} toyworld images with masks and captions to {out}")
    return 0


def cmd_demo(a) -> int:
    """The method end to end on toyworld through the Python API: synthesize + label, then score."""
    import numpy as np
    from PIL import Image

    from factory import Concept, DistillConfig, Distiller, SampleSpec
    from factory.toyworld.world import CONCEPTS, write_split
    from factory.visualize import contact_sheet
    from trainers.evaluate_masks import evaluate_distiller, markdown_table

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    d = Distiller(a.model, config=DistillConfig(guidance_scale=a.guidance, negative_prompt=""))
    specs = [SampleSpec(Concept(CONCEPTS[i % len(CONCEPTS)]), seed=i) for i in range(a.n)]
    triplets = []
    for i in range(0, len(specs), 8):
        triplets += d.synthesize(specs[i : i + 8])
        print(f"synthesized {len(triplets)}/{len(specs)}", flush=True)
    (out / "synthetic").mkdir(exist_ok=True)
    for tr in triplets:
        Image.fromarray(tr.image).save(out / "synthetic" / f"{tr.key}.png")
        Image.fromarray((tr.mask * 255).astype(np.uint8)).save(out / "synthetic" / f"{tr.key}.mask.png")
        (out / "synthetic" / f"{tr.key}.json").write_text(json.dumps(tr.meta, indent=1))
    contact_sheet([[t.image, t.attention.astype(np.float32), t.prelim, t.background, t.mask, t.foreground]
                   for t in triplets[:12]], ["image", "attention", "M_pre", "background", "refined M", "foreground"],
                  row_labels=[t.key for t in triplets[:12]]).save(out / "synthetic_sheet.png")
    split = write_split(out / "toyworld-test", range(2_000_000_000, 2_000_000_000 + a.n_eval))
    res = evaluate_distiller(d, split, batch=16, out=out / "eval")
    print(markdown_table(res))
    print(f"demo done in {time.time() - t0:.0f}s: synthetic triplets in {out / 'synthetic'}, "
          f"contact sheets {out / 'synthetic_sheet.png'} and {out / 'eval' / 'contact_sheet.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="factory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("toyworld-split", help="write a labelled toyworld split")
    s.add_argument("--out", required=True)
    s.add_argument("--seeds", type=_seeds, default=range(0, 200))
    s.add_argument("--size", type=int, default=64)
    s.set_defaults(fn=cmd_toyworld_split)
    s = sub.add_parser("demo", help="run the method on the embedded toyworld model")
    s.add_argument("--out", default="out/demo")
    s.add_argument("--model", default="toyworld")
    s.add_argument("--n", type=int, default=24, help="synthetic samples")
    s.add_argument("--n-eval", type=int, default=64, help="held-out labelled images to score")
    s.add_argument("--guidance", type=float, default=3.0)
    s.set_defaults(fn=cmd_demo)
    a = p.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
