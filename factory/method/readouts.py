"""Concept-map readouts: which quantity of the denoiser's attention becomes the concept map.

    READOUTS["image_to_text"]   # the one-line description; a job's `sampler.readout` takes these names
    Readout(name="concept_output", layers=(15, 16, 17, 18), background_words=("background",))

- ``image_to_text`` (the paper's, and the default): the softmax of the image queries over the text keys,
  at the concept's tokens. In a UNet that is its cross-attention; in a DiT (SD3, FLUX) it is the
  image-to-text block of the joint attention, renormalised over the text keys
  (`factory.method.attention`). Layers: every cross- or joint-attention layer, or the ones chosen by index
  (in `attention.cross_attention_names` order: FLUX's double-stream blocks, then its single-stream ones).
- ``concept_output``: ConceptAttention (Helbling et al., ICML 2025): the concept and a few background words
  each become a token stream of their own that reuses the text stream's weights (a single-stream block's
  shared ones) and attends one way to [concepts; image], so the image is unchanged; the map is the
  concept's attention output dotted with the image tokens' attention outputs, a softmax over the words,
  averaged over the chosen blocks and the recorded steps (`factory.method.concept_attention`). FLUX.1,
  FLUX.2 and Z-Image. Layers are numbered as above (double-stream, then single-stream blocks). Default
  layers: the last four double-stream blocks of FLUX.1 (15-18 of 19, the paper's choice), the last three of
  FLUX.2 (5-7 of 8, ConceptAttention's FLUX.2 default), every main layer of Z-Image.

The recorded steps are the sampler's T0 least-noisy ones (`sampler.probe_t0`) for either readout. This
module imports no torch: a job YAML is validated against the names without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from factory.registry import Registry

READOUTS: Registry[str] = Registry("concept-map readout")
READOUTS.register(
    "image_to_text",
    "softmax of image queries over text keys at the concept's tokens (cross-attention; a DiT's joint "
    "attention's image-to-text block)",
)
READOUTS.register(
    "concept_output",
    "ConceptAttention: concept-word streams attending one way to the image; their attention outputs dotted "
    "with the image's, softmax over the concept and background words (FLUX.1, FLUX.2, Z-Image)",
)

DEFAULT_BACKGROUND_WORDS = ("background",)
# default layers of `concept_output`, per transformer layout: its last few double-stream blocks (FLUX.1:
# 15-18 of 19, the paper's; FLUX.2: 5-7 of 8, ConceptAttention's FLUX.2 default)
CONCEPT_OUTPUT_LAST_BLOCKS = {"flux": 4, "flux2": 3}


@dataclass(frozen=True)
class Readout:
    """Which readout a capture records, on which layers, with which background words.

    Args:
        name: a `READOUTS` name.
        layers: layer indices to record (see the module docstring); None = the readout's default.
        background_words: `concept_output`'s other words, against which the concept's softmax is taken.
        streams: `concept_output`'s word streams for one batch (`concept_attention.ConceptStreams`), set by
            the Distiller per micro-batch; None for `image_to_text`.
    """

    name: str = "image_to_text"
    layers: tuple[int, ...] | None = None
    background_words: tuple[str, ...] = DEFAULT_BACKGROUND_WORDS
    streams: Any = None

    def __post_init__(self):
        READOUTS.check(self.name)
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(f"readout layers must be a non-empty list of indices >= 0, got {self.layers}")
        if self.name == "concept_output" and not self.background_words:
            raise ValueError("the concept_output readout needs at least one background word")
