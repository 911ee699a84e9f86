"""`trainers`: the training entry points of Concept Factory.

trainers pretrain-toyworld [...]   pretrain the toyworld foundation model (CPU recipe)
trainers pretrain-toyworld-dit [...] pretrain the toyworld DiT (FLUX.1 architecture, CPU recipe)
trainers toyworld-quality [...]    measure the toyworld model's attention probe against ground truth
trainers toyworld-classifier [...] concept accuracy of the toyworld model's samples (shape classifier)
trainers evaluate-masks [...]      score the method's masks (M_pre, refined M, attention AUC) on a split
trainers finetune CONFIG [...]     concept fine-tuning (paper Step 3): DeepSpeed inside Ray Train
trainers students CONFIG [...]     timm-backbone students (paper Step 6), every concept at once on Ray
trainers evaluate [...]            score a student, a mask folder or GrabCut on a labelled set (ACC/IoU/mIoU)
trainers toyworld-tables [...]     the paper's Tables 1 and 2 end to end in toyworld (one command)
trainers scheduler-sweep [...]     refined-mask IoU per Step-4 sampler and step count on a split
trainers readout-sweep [...]       AUC, M_pre and refined M per concept-map readout and window on a split

Model-loading bars and library log lines are off; --verbose (finetune, students) or CF_VERBOSE=1 brings
them back. A mistake of the user's is one line, `trainers CMD: error: ...` (exit 2); --debug shows the
traceback.
"""

from __future__ import annotations

import sys

COMMANDS = {
    "pretrain-toyworld": ("trainers.toyworld.pretrain", "pretrain the toyworld foundation model"),
    "pretrain-toyworld-dit": ("trainers.toyworld.pretrain_dit", "pretrain the toyworld DiT (FLUX.1)"),
    "toyworld-quality": ("trainers.toyworld.quality", "measure the toyworld model against ground truth"),
    "toyworld-classifier": ("trainers.toyworld.classifier", "concept accuracy of toyworld samples"),
    "evaluate-masks": ("trainers.evaluate.method_masks", "score the method's masks on a labelled split"),
    "finetune": ("trainers.finetune.train", "concept fine-tuning with DeepSpeed on Ray Train"),
    "students": ("trainers.students.train", "train segmentation students on shards"),
    "evaluate": ("trainers.evaluate.score", "score a student or mask source on a labelled set"),
    "toyworld-tables": ("trainers.toyworld.tables", "the paper's tables in toyworld"),
    "scheduler-sweep": ("trainers.toyworld.scheduler_sweep", "mask IoU per Step-4 sampler and step count"),
    "readout-sweep": ("trainers.toyworld.readout_sweep", "masks per concept-map readout and window"),
}


def main(argv: list[str] | None = None) -> int:
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    from factory.dataset.console import verbose_from_env
    from factory.errors import run_command
    from factory.method.loading import quiet_model_libraries

    # diffusers' and transformers' loading bars off for every command, unless --verbose or CF_VERBOSE=1
    quiet_model_libraries("--verbose" in argv or verbose_from_env())
    debug = "--debug" in argv
    rest = [x for x in argv[1:] if x != "--debug"]
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return run_command(f"trainers {argv[0]}", lambda: module.main(rest), debug=debug)


if __name__ == "__main__":
    sys.exit(main())
