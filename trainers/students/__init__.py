"""Segmentation students on timm backbones (paper Step 6): `trainers students`.

data    triplet shards -> student examples; the paper's resize, crop and flip
train   one student per concept, all at once (Ray Tune over Ray Train), export
"""
