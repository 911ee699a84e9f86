"""`trainers`: the training entry points of Concept Factory.

    trainers pretrain-toyworld [...]   pretrain the toyworld foundation model (CPU recipe)
    trainers toyworld-quality [...]    measure the toyworld model's attention probe against ground truth
    trainers evaluate-masks [...]      score the method's masks (M_pre, refined M, attention AUC) on a labelled split
    trainers finetune CONFIG [...]     concept fine-tuning (paper Step 3): DeepSpeed inside Ray Train
"""

from __future__ import annotations

import sys

COMMANDS = {
    "pretrain-toyworld": ("trainers.toyworld_pretrain", "pretrain the toyworld foundation model"),
    "toyworld-quality": ("trainers.toyworld_quality", "measure the toyworld model against ground truth"),
    "evaluate-masks": ("trainers.evaluate_masks", "score the method's masks on a labelled split"),
    "finetune": ("trainers.finetune", "concept fine-tuning with DeepSpeed on Ray Train"),
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
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
