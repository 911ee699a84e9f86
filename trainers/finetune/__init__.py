"""Concept fine-tuning (paper Step 3): DeepSpeed inside Ray Train (`trainers finetune`).

config       the fine-tuning YAML and the DeepSpeed config built from it
data         label-mode shards -> training examples (whole image, or a background rectangle)
rectangles   the reference code's background-rectangle rules
train        the worker loop, checkpoints, export, and the driver
"""
