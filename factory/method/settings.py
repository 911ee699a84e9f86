"""The method's settings: what to segment (`Concept`), one sample to make (`SampleSpec`), and how
(`DistillConfig`). Plain data, no torch: a job YAML is validated against them without loading a model.

The choices of each axis come from its registry (`factory.registry`), where it is implemented: mask rules
(`factory.method.masks.RULES`), edge modes (`factory.method.edges.EDGES`), samplers
(`factory.method.schedulers.SCHEDULERS`); model families are detected, not chosen
(`factory.method.families.FAMILIES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from factory.method.edges import EDGES
from factory.method.masks import RULES
from factory.method.readouts import DEFAULT_BACKGROUND_WORDS, Readout
from factory.method.schedulers import SCHEDULERS

DEFAULT_TEMPLATE = "a photo of a {concept}"
BACKGROUND_PROMPT = "a photo of a background"
# Where synthesis reads the concept map: "loop" (in the denoising loop), or "probe" (paper Step 1 afterwards)
AttentionSource = Literal["loop", "probe"]


@dataclass(frozen=True)
class Concept:
    """A concept to segment: its name, the prompt template, and the words whose attention is summed.

    Args:
        name: the concept as it appears in the prompt, e.g. "bird".
        template: the prompt, with `{concept}` where the name goes (the paper: "a photo of a {concept}").
        words: the prompt words whose cross-attention is summed into the concept map; default: `(name,)`.
            A word that the tokenizer splits into several tokens counts with all of them.

    Example:
        >>> Concept("bird").prompt
        'a photo of a bird'
        >>> human = Concept("human", "a photo of a {concept} with arms and legs", ("human", "arms", "legs"))
        >>> human.token_words
        ['human', 'arms', 'legs']
    """

    name: str
    template: str = DEFAULT_TEMPLATE
    words: tuple[str, ...] = ()

    @property
    def prompt(self) -> str:
        return self.template.format(concept=self.name)

    @property
    def token_words(self) -> list[str]:
        return list(self.words) if self.words else [self.name]


@dataclass(frozen=True)
class SampleSpec:
    """One sample to synthesize: its concept, the seed that fixes every random draw, and its key.

    Args:
        concept: what to draw and segment.
        seed: the per-sample seed; a sample depends only on (config, seed), not on its batch.
        key: the sample's key in the shards; default `"{concept}-{seed:010d}"`.

    Example:
        >>> SampleSpec(Concept("star"), seed=3).seed
        3
    """

    concept: Concept
    seed: int
    key: str = ""


@dataclass
class DistillConfig:
    """The method's settings for one `Distiller` (a job YAML's `sampler`, `masks` and `inpaint` sections).

    The defaults are the paper's: 50 DDIM steps, attention over the 40 least-noisy, the GMM midpoint rule,
    50-step background inpainting, guidance scale 1. Invalid combinations raise ValueError at once.

    Example:
        >>> DistillConfig(num_inference_steps=20, probe_t0=16, inpaint_steps=20).mask_rule
        'gmm'
    """

    num_inference_steps: int = 50  # T: the DDIM grid
    probe_t0: int = 40  # T0: least-noisy steps whose attention is averaged
    probe_repeats: int = 1  # N
    mask_rule: str = "gmm"  # gmm | gmm3 | otsu (Step 2 and 4b)
    close_and_fill: bool = False
    # Beyond the paper: snap the refined mask's edges to the image's (guided filter; "none" = the paper's).
    # The radius is in latent cells (x the VAE factor in pixels: 12 px in toyworld, 24 px in SD at 512).
    edges: str = "guided"
    edge_radius: float = 3.0
    edge_eps: float = 0.01
    inpaint_steps: int = 50
    object_guidance: float = 0.0  # eps_b + s (eps_f - eps_b) while inpainting; s < 0 avoids the object
    background_prompt: str = BACKGROUND_PROMPT
    guidance_scale: float = 1.0  # synthesis; the paper samples with 1
    negative_prompt: str = ""  # synthesis's unguided branch ("" or the background prompt, as the paper)
    attention: AttentionSource = (
        "loop"  # synthesis: "loop" (in the denoising loop) or "probe" (paper Step 1 afterwards)
    )
    scheduler: str = "ddim"  # synthesis's sampler (factory.method.schedulers); the probe keeps DDIM's grid
    inpaint_scheduler: str = "ddim"  # Step 4's sampler
    resolution: int | None = None  # canvas side; default: the model's native resolution
    # Which attention quantity is the concept map (factory.method.readouts): "image_to_text" (the paper's)
    # or "concept_output" (ConceptAttention, FLUX); the layers it records (None: the readout's default) and
    # concept_output's background words.
    readout: str = "image_to_text"
    readout_layers: tuple[int, ...] | None = None
    background_words: tuple[str, ...] = DEFAULT_BACKGROUND_WORDS
    # Samples per model call. None = 1 on the CPU (CPU convolutions are not bitwise batch-invariant, so
    # this keeps a sample's arrays independent of its batch; batching gains ~nothing there) and up to
    # GPU_MICRO_BATCH on a GPU (where results may differ in the last bits between batch sizes): a long list
    # given to `synthesize` or `label` never goes through the model in one batch.
    micro_batch: int | None = None
    # Speed only: torch.compile the UNet(s) once (the first batch pays the compile time). The capture
    # processors are then installed for good, so that a batch does not recompile.
    compile: bool = False
    channels_last: bool = False  # speed only: UNet(s) and VAE in channels_last memory format (GPUs)

    def __post_init__(self):
        RULES.check(self.mask_rule)
        EDGES.check(self.edges)
        SCHEDULERS.check(self.scheduler)
        SCHEDULERS.check(self.inpaint_scheduler)
        if self.readout_layers is not None:
            self.readout_layers = tuple(int(i) for i in self.readout_layers)
        self.background_words = tuple(self.background_words)
        self.readout_spec()  # validates the readout's name, layers and words
        if self.attention not in get_args(AttentionSource):
            raise ValueError(f"attention must be 'loop' or 'probe', got {self.attention!r}")
        if not (self.edge_radius > 0 and self.edge_eps > 0):
            raise ValueError(f"edge_radius and edge_eps must be > 0, got {self.edge_radius}, {self.edge_eps}")
        if not 0 < self.probe_t0 <= self.num_inference_steps:
            raise ValueError("probe_t0 must be in 1..num_inference_steps")

    def readout_spec(self, streams=None) -> Readout:
        """The concept-map readout these settings choose (with one batch's word streams, if given)."""
        return Readout(self.readout, self.readout_layers, self.background_words, streams)
