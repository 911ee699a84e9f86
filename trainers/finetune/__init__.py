"""Concept fine-tuning (paper Step 3): DeepSpeed inside Ray Train (`trainers finetune`).

config       the fine-tuning YAML and the DeepSpeed config built from it
data         label-mode shards -> training examples (whole image, or a background rectangle)
rectangles   the reference code's background-rectangle rules
worker       a worker's lasting pieces: prompt cache, fixed batch, loss window, checkpoints
train        the worker loop, export, and the driver
"""
