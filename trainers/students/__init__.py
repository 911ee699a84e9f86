"""Segmentation students on timm backbones (paper Step 6): `trainers students`.

config  the students YAML (`StudentsConfig`)
model   a segmentation_models_pytorch decoder on a timm backbone, its loss and prediction
data    triplet shards -> student examples; the paper's resize, crop and flip
loop    one student's training loop on each Ray Train worker
tune    the rows each student trains on, one Ray Train run per student, all at once under Ray Tune
export  the exported student (state dicts, TorchScript, student.json) and loading it
train   the command
"""
