"""A shape classifier trained on toyworld ground truth, to measure whether generated samples are recognizable.

"Text-to-image samples of each concept must be recognizable" needs a number, not only a picture. toyworld
knows the true shape of every render, so a small CNN trained on renders (6 shapes + "no object") can read
generated images the way an Inception network reads ImageNet samples: the fraction of samples of
"a photo of a {concept}" that it classifies as {concept} is the *concept accuracy* of the model
(chance: 1/6; "no object" counts as a miss).

Generated 64x64 images pass through the VAE decoder, which blurs edges, so the classifier trains on renders
with random blur, noise and flips, and its accuracy is reported both on crisp held-out renders and on their
VAE reconstructions (the best a sample decoded by that VAE could score). The shipped classifier (defaults
below, 10 minutes on 2 cores) reads 0.954 of 700 held-out renders right (every class 0.92-0.99) and 0.84 of
their reconstructions by the toyworld VAE. Its first version, which read a 2x2-mean 32x32 copy and trained on
half the renders for two thirds of the steps, reached 0.787 (hearts 0.50): too weak a yardstick to tell a
badly drawn heart from a misread one.

    trainers toyworld-classifier --model toyworld --per-concept 50
    trainers toyworld-classifier --model toyworld --retention 0.3 0.5   (+ shape retention)
    trainers toyworld-classifier --shards out/tables/synthetic     (a written synthetic dataset, e.g. D'_s)
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from factory.method.loading import MODELS_DIR
from factory.toyworld.world import CONCEPTS, render

CLASSES: tuple[str, ...] = (*CONCEPTS, "none")
TRAIN_SEED_BASE = (
    4_000_000_000  # disjoint from the pretraining pool, early stopping, quality and tables seeds
)
TEST_SEED_BASE = 4_100_000_000
# shipped beside the toyworld model (about 2.3 MB), like an Inception network for FID: a fixed yardstick
DEFAULT_PATH = MODELS_DIR / "toyworld-shape-classifier.safetensors"


def build_classifier() -> nn.Module:
    """A small CNN over the full 64x64 image: a learned stride-2 stem (a 2x2 mean, as the first version had,
    blurred away the corners that tell a square or a heart from a blob), then three stride-2 blocks."""

    def block(i: int, o: int) -> list[nn.Module]:
        return [
            nn.Conv2d(i, o, 3, padding=1),
            nn.BatchNorm2d(o),
            nn.ReLU(inplace=True),
            nn.Conv2d(o, o, 3, padding=1, stride=2),
            nn.BatchNorm2d(o),
            nn.ReLU(inplace=True),
        ]

    stem = [nn.Conv2d(3, 32, 4, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True)]  # 32x32
    return nn.Sequential(
        *stem,
        *block(32, 64),
        *block(64, 128),
        *block(128, 128),  # 16, 8, 4
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, len(CLASSES)),
    )


def renders(n: int, seed_base: int, balanced: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """n renders and their class indices. Every 7th is background-only; the others show the shapes in turn
    (`balanced`, for test sets) or the shape the seed draws (the training set)."""
    images, labels = [], []
    for i in range(n):
        k = i % len(CLASSES)
        none = k == len(CLASSES) - 1
        s = render(seed_base + i, concept=None if none or not balanced else CLASSES[k], background_only=none)
        images.append(s.image)
        labels.append(CLASSES.index(s.concept) if s.concept else len(CLASSES) - 1)
    return np.stack(images), np.asarray(labels)


def to_input(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 or float in [0, 1] -> (B, 3, H, W) float in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    if images.dtype == np.uint8:
        x = x / 255.0
    return x * 2 - 1


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random blur (sigma 0..1 px), noise and flips: the classifier must read decoder-blurred samples."""
    b = x.shape[0]
    sigma = torch.rand(b, generator=g)
    k = torch.arange(-3, 4, dtype=torch.float32)
    kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    kern = kern / kern.sum(1, keepdim=True)  # (B, 7) separable kernels
    xb = x.reshape(1, b * 3, *x.shape[2:])
    kx = kern.repeat_interleave(3, 0)[:, None, None, :]
    xb = F.conv2d(F.pad(xb, (3, 3, 0, 0), mode="replicate"), kx, groups=b * 3)
    xb = F.conv2d(F.pad(xb, (0, 0, 3, 3), mode="replicate"), kx.transpose(2, 3), groups=b * 3)
    x = xb.reshape_as(x) + torch.randn(x.shape, generator=g) * (torch.rand(b, 1, 1, 1, generator=g) * 0.1)
    flip = torch.rand(b, generator=g) < 0.5
    x[flip] = x[flip].flip(-1)
    return x


def train_classifier(
    n_train: int = 32000,
    steps: int = 6000,
    batch: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    n_test: int = 700,
) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    images, labels = renders(n_train, TRAIN_SEED_BASE, balanced=False)
    x_all, y_all = to_input(images), torch.from_numpy(labels)
    model = build_classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in tqdm(range(steps), desc="shape classifier", mininterval=5, leave=False):
        idx = torch.randint(len(x_all), (batch,), generator=g)
        loss = F.cross_entropy(model(_augment(x_all[idx], g)), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    test_images, test_labels = renders(n_test, TEST_SEED_BASE)
    pred = predict(model, test_images)
    per_class = {c: float((pred[test_labels == k] == k).mean()) for k, c in enumerate(CLASSES)}
    return model, {
        "n_train": n_train,
        "steps": steps,
        "batch": batch,
        "test_accuracy": float((pred == test_labels).mean()),
        "test_per_class": per_class,
        "seconds": time.time() - t0,
        "threads": torch.get_num_threads(),
    }


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch: int = 256) -> np.ndarray:
    model.eval()
    return np.concatenate(
        [model(to_input(images[i : i + batch])).argmax(1).numpy() for i in range(0, len(images), batch)]
    )


def load_or_train(path: Path = DEFAULT_PATH) -> tuple[nn.Module, dict]:
    """The classifier saved at `path` (safetensors + a .json of its training facts), or a freshly trained one
    saved there (minutes on 2 cores)."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    meta = path.with_suffix(".json")
    if path.exists():
        model = build_classifier()
        model.load_state_dict(load_file(path))
        return model.eval(), json.loads(meta.read_text()) if meta.exists() else {}
    model, info = train_classifier()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    meta.write_text(json.dumps(info, indent=1))
    tmp.replace(path)
    return model, info


@torch.no_grad()
def vae_roundtrip(vae, images: np.ndarray) -> np.ndarray:
    """Images after VAE encode (mean) + decode: the ceiling for decoded samples."""
    x = to_input(images).to(vae.device, vae.dtype)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((rec.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()


def reconstruction_accuracy(classifier: nn.Module, vae, n: int = 350) -> float:
    """The classifier's accuracy on held-out renders after a VAE round trip."""
    images, labels = renders(n, TEST_SEED_BASE)
    return float((predict(classifier, vae_roundtrip(vae, images)) == labels).mean())


def generate(
    pipe,
    concept: str,
    n: int,
    guidance: float = 3.0,
    steps: int = 50,
    seed: int = 0,
    batch: int = 25,
    negative_prompt: str | None = None,
) -> np.ndarray:
    """n samples of "a photo of a {concept}" in [0, 1], (n, H, W, 3); seed i is seed + i. A negative prompt
    replaces the empty prompt that classifier-free guidance steers away from."""
    out = []
    for i in range(0, n, batch):
        k = min(batch, n - i)
        gens = [torch.Generator(device="cpu").manual_seed(seed + i + j) for j in range(k)]
        out.append(
            pipe(
                [f"a photo of a {concept}"] * k,
                num_inference_steps=steps,
                guidance_scale=guidance,
                negative_prompt=None if negative_prompt is None else [negative_prompt] * k,
                generator=gens,
                output_type="np",
            ).images
        )
    return np.concatenate(out)


def concept_accuracy(
    pipe,
    classifier: nn.Module,
    per_concept: int = 50,
    guidance: float = 3.0,
    steps: int = 50,
    seed: int = 0,
    negative_prompt: str | None = None,
) -> dict:
    """Fraction of "a photo of a {concept}" samples that the classifier reads as {concept}, per concept,
    plus the confusion counts (rows: prompted concept, columns: CLASSES)."""
    pipe.set_progress_bar_config(disable=True)
    images = {
        concept: generate(
            pipe, concept, per_concept, guidance, steps, seed + 1000 * ci, negative_prompt=negative_prompt
        ).astype(np.float32)
        for ci, concept in enumerate(CONCEPTS)
    }
    settings = {} if negative_prompt is None else {"negative_prompt": negative_prompt}
    return accuracy_report(
        classifier, images, per_concept_samples=per_concept, guidance=guidance, steps=steps, **settings
    )


def shape_retention(
    pipe,
    classifier: nn.Module,
    strength: float,
    per_concept: int = 20,
    guidance: float = 3.0,
    steps: int = 50,
    seed: int = 0,
) -> dict:
    """Concept accuracy after an SDEdit round trip: held-out renders of each concept are noised to `strength`
    (0.3: t ~ 300 of 1000) and denoised by the model with "a photo of a {concept}". Where samples come out as
    blobs this says which part of the sampler loses the shape: if a lightly noised square already comes back
    as a blob, the low-noise denoiser does, whatever the high-noise steps decide. The ceiling is the
    classifier's accuracy on VAE reconstructions."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(
            f"strength is the fraction of the noise schedule to re-noise to, in (0, 1]; got {strength}"
        )
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    images = {}
    for ci, concept in enumerate(CONCEPTS):
        src = [
            Image.fromarray(
                render(TEST_SEED_BASE + 10_000 * (ci + 1) + j, concept=concept, background_only=False).image
            )
            for j in range(per_concept)
        ]
        gens = [torch.Generator(device="cpu").manual_seed(seed + 1000 * ci + j) for j in range(per_concept)]
        images[concept] = img2img(
            [f"a photo of a {concept}"] * per_concept,
            image=src,
            strength=strength,
            guidance_scale=guidance,
            num_inference_steps=steps,
            generator=gens,
            output_type="np",
        ).images.astype(np.float32)
    return accuracy_report(
        classifier, images, per_concept_samples=per_concept, strength=strength, guidance=guidance, steps=steps
    )


def score_by_concept(classifier: nn.Module, images: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """For each concept's images: the fraction the classifier reads as that concept, and the counts of what it
    reads them as (indexed by CLASSES)."""
    per, confusion = {}, {}
    for concept, imgs in images.items():
        pred = predict(classifier, imgs)
        per[concept] = float((pred == CLASSES.index(concept)).mean())
        confusion[concept] = np.bincount(pred, minlength=len(CLASSES)).tolist()
    return per, confusion


def accuracy_report(classifier: nn.Module, images: dict[str, np.ndarray], **settings) -> dict:
    """score_by_concept's figures with their mean over concepts, the class order and the settings that made
    the images: what concept_accuracy and shape_retention return."""
    per, confusion = score_by_concept(classifier, images)
    return {
        "mean": float(np.mean(list(per.values()))),
        "per_concept": per,
        "confusion": confusion,
        "classes": list(CLASSES),
        **settings,
    }


def shard_recognizability(classifier: nn.Module, source: str) -> dict:
    """Concept accuracy of a written dataset: the images (`.png`) of the WebDataset shards at `source` (a
    job's output folder, a glob or a list; any fsspec URL), grouped by the concept in their metadata."""
    from PIL import Image

    from factory.dataset.shards import read_tar
    from factory.dataset.sources import list_shards

    images: dict[str, list[np.ndarray]] = {}
    for url in list_shards(source):
        for sample in read_tar(url):
            if "png" not in sample or "json" not in sample:
                raise ValueError(
                    f"{url}: sample {sample['__key__']} has no .png image or no .json metadata; "
                    "is this a `factory generate` / `factory label` output?"
                )
            concept = json.loads(sample["json"])["concept"]
            if concept not in CONCEPTS:
                raise ValueError(
                    f"{url}: concept {concept!r} is not a toyworld shape ({', '.join(CONCEPTS)}); "
                    "the shape classifier only reads toyworld datasets"
                )
            images.setdefault(concept, []).append(
                np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
            )
    per, confusion = score_by_concept(classifier, {c: np.stack(v) for c, v in sorted(images.items())})
    return {
        "per_concept": per,
        "confusion": confusion,
        "classes": list(CLASSES),
        "samples": {c: len(v) for c, v in sorted(images.items())},
    }


def main(argv: list[str] | None = None) -> None:
    from factory.method.loading import load_pipeline

    p = argparse.ArgumentParser(
        prog="trainers toyworld-classifier",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="toyworld")
    p.add_argument("--classifier", default=str(DEFAULT_PATH), help="cached classifier (trained if missing)")
    p.add_argument("--per-concept", type=int, default=50)
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument(
        "--negative-prompt",
        default=None,
        help="sample with this negative prompt instead of the empty one (concept accuracy only)",
    )
    p.add_argument(
        "--retention",
        type=float,
        nargs="*",
        default=[],
        metavar="STRENGTH",
        help="also measure shape retention: renders noised to each STRENGTH (e.g. 0.3 0.5) and denoised",
    )
    p.add_argument(
        "--shards",
        default=None,
        help="instead of sampling the model: read the images of these "
        "WebDataset shards (a factory job's output, e.g. out/tables/synthetic) by their concept",
    )
    a = p.parse_args(argv)
    classifier, info = load_or_train(Path(a.classifier))
    if a.shards:
        print(
            json.dumps(
                {"classifier": info, "shards": a.shards, **shard_recognizability(classifier, a.shards)},
                indent=1,
            )
        )
        return
    pipe = load_pipeline(a.model)
    info["vae_reconstruction_accuracy"] = reconstruction_accuracy(classifier, pipe.vae)
    result = {"classifier": info}
    for gs in a.guidance:
        result[f"guidance_{gs:g}"] = concept_accuracy(
            pipe, classifier, a.per_concept, gs, a.steps, negative_prompt=a.negative_prompt
        )
    for strength in a.retention:
        result[f"retention_{strength:g}"] = shape_retention(
            pipe, classifier, strength, guidance=a.guidance[0], steps=a.steps
        )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
