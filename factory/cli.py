"""`factory`: the Concept Factory command line.

    factory generate CONFIG [--set KEY=VALUE ...]            synthesize + label into WebDataset shards (Ray)
    factory label CONFIG --input SRC [--set KEY=VALUE ...]   label your own images into shards (Ray)
    factory refine CONFIG --from OUT --set inpaint.model=M'  their masks again with m', no probe (Ray)
    factory toyworld-split --out DIR --seeds 0:200 [--concept star]   write a labelled toyworld split
    factory bench [--model sd15-arch --steps 50 --batch 8 ...]        triplet vs plain diffusers, one run

Each job command takes --dry-run (check and print the plan, start nothing), --verbose (Ray's and diffusers'
log lines and loading bars; quiet by default) and --debug (a traceback with an error). A mistake of the
user's is one line, `factory: error: ...`, and exit status 2.

Concept fine-tuning, students and evaluation are `trainers` commands (`trainers --help`).
"""

from __future__ import annotations

import argparse
import sys

from factory.errors import run_command


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

    out = write_split(a.out, a.seeds, a.size, a.concept)
    what = f"{a.concept} images" if a.concept else "images"
    print(f"wrote {len(a.seeds)} toyworld {what} with masks and captions to {out}")
    return 0


def cmd_generate(a) -> int:
    from factory.dataset.config import load_config
    from factory.dataset.pipeline import run_job

    cfg = load_config(a.config, a.set)
    summary = run_job(cfg, "generate", verbose=a.verbose or None, dry_run=a.dry_run)
    return 0 if a.dry_run or summary["complete"] else 1


def cmd_label(a) -> int:
    from factory.dataset.config import load_config
    from factory.dataset.pipeline import run_job
    from factory.dataset.sources import list_images

    cfg = load_config(a.config, a.set)
    sources = list_images(a.input)
    print(f"[factory] label: {len(sources)} images from {a.input}")
    summary = run_job(cfg, "label", sources, verbose=a.verbose or None, dry_run=a.dry_run)
    return 0 if a.dry_run or summary["complete"] else 1


def cmd_refine(a) -> int:
    from factory.dataset.config import load_config
    from factory.dataset.pipeline import run_job

    cfg = load_config(a.config, [*a.set, f"input.refine_from={a.source}"])
    summary = run_job(cfg, "refine", verbose=a.verbose or None, dry_run=a.dry_run)
    return 0 if a.dry_run or summary["complete"] else 1


def cmd_bench(a) -> int:
    from factory.bench import main as bench_main

    return bench_main(a)


def _add_job_args(s) -> None:
    s.add_argument("config", help="job YAML (see configs/)")
    s.add_argument(
        "--verbose", action="store_true", help="show Ray's and diffusers' log lines and loading bars"
    )
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="run the preflight checks, print the plan (shards, samples, what is skipped) and exit",
    )
    s.add_argument("--debug", action="store_true", help="show the traceback of an error")
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field by dotted path, e.g. --set output.uri=s3://b/x "
        "--set concepts.0.samples=10",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="factory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("generate", help="synthesize and label triplets into WebDataset shards on Ray")
    _add_job_args(s)
    s.set_defaults(fn=cmd_generate)
    s = sub.add_parser("label", help="label your own images into WebDataset shards on Ray")
    _add_job_args(s)
    s.add_argument(
        "--input", required=True, help="a folder, a glob or a .txt list of image URLs (any fsspec URL)"
    )
    s.set_defaults(fn=cmd_label)
    s = sub.add_parser(
        "refine",
        help="draft a label or generate output's samples again from their concept maps (no probe), "
        "inpainting with the job's inpaint.model: the paper's relabelling with m'",
    )
    _add_job_args(s)
    s.add_argument(
        "--from", dest="source", required=True, help="the output to refine (made with the job's model)"
    )
    s.set_defaults(fn=cmd_refine)
    s = sub.add_parser("toyworld-split", help="write a labelled toyworld split")
    s.add_argument("--out", required=True)
    s.add_argument("--seeds", type=_seeds, default=range(0, 200))
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--concept", default=None, help="only images of this concept (a one-concept data set)")
    s.add_argument("--debug", action="store_true", help="show the traceback of an error")
    s.set_defaults(fn=cmd_toyworld_split)
    s = sub.add_parser("bench", help="time a triplet against plain diffusers generation, side by side")
    from factory.bench import add_arguments

    add_arguments(s)
    s.add_argument("--debug", action="store_true", help="show the traceback of an error")
    s.set_defaults(fn=cmd_bench)
    a = p.parse_args(argv)
    return run_command("factory", lambda: a.fn(a), debug=a.debug)


if __name__ == "__main__":
    sys.exit(main())
