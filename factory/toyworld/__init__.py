"""toyworld: the embedded default. A procedural world with exact ground truth, and the tiny
Stable-Diffusion-architecture model trained on it (`factory/models/toyworld`).

    world       renders images of one shape on cluttered backgrounds, with masks and captions
    tokenizer   the CLIP-format tokenizer of the world's vocabulary
    model       the UNet / VAE / text-encoder configs of the toyworld model
"""
