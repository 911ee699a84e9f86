"""Students (paper Step 6): timm-backbone segmenters trained on triplet shards, every concept at once.

    trainers students configs/students-toyworld.yaml [--set KEY=VALUE ...]

Per concept, one Ray Train run (a `TorchTrainer`, `scaling.workers` DDP workers) trains a binary student
on that concept's rows of the shards; Ray Tune runs the concepts' runs concurrently, one trial each
(`scaling.max_concurrent` at a time). `multiclass: true` trains one student (background + C concepts) on
the union instead. Students are `segmentation_models_pytorch` decoders on any timm backbone (`tu-<name>`).

One training step, top to bottom:
  (image, target) batch (`trainers.students.data`: refined masks by default, M_pre or soft attention as
  options; resize, random crop, flip) from the worker's share of the rows that the trial prepared once in
  Ray Data (`data.cache`, the default), or from its Ray Data shard, streamed every epoch
  -> logits = student(image)   (student and batch in channels_last, `train.channels_last`)
  -> loss = BCE(logits, target) [+ Dice]  (softmax cross-entropy for the multi-class student)
  -> Adam step (lr 2e-3, fixed step budget: the paper's "standardized" recipe)
Every `checkpoint.every` steps the student is scored on held-out rows (1 in `data.val_every` by key hash;
their targets are pseudo-labels too, as the paper validates on refined masks) and reported to Ray Train with
a checkpoint. The best (by validation IoU against the pseudo-labels) and last weights are exported as state
dicts plus TorchScript, with a `student.json` that `trainers evaluate` reads.

The modules, by job: `config` (the YAML), `model` (the student, its loss and prediction), `data` (shard rows
to training examples), `loop` (one worker's training loop), `tune` (the rows, one Ray Train run per student,
the Tune run over all of them), `export` (the exported student and loading it); this module is the command.
"""

from __future__ import annotations

import os

from trainers.students.config import load_students_config
from trainers.students.model import PretrainedWeightsError, build_student
from trainers.students.tune import run_students


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from factory.yaml_config import ConfigError

    p = argparse.ArgumentParser(
        prog="trainers students", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("config", help="students YAML (see configs/students-*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--verbose", action="store_true", help="show Ray's log lines")
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    try:
        cfg = load_students_config(a.config, a.set)
        build_student(
            cfg.model.backbone, 1, cfg.model.decoder, cfg.model.pretrained, cfg.model.decoder_kwargs
        )  # fail before Ray starts
    except (ConfigError, ValueError, PretrainedWeightsError) as err:
        print(f"trainers students: error: {err}", file=sys.stderr)
        return 2
    run_students(cfg, verbose=a.verbose or None)
    return 0
