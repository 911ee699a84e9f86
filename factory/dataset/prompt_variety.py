"""Prompt variety: each generated sample's prompt, drawn from its concept's templates and attribute values
(or its plain list of prompts) by the sample's seed alone, so a rerun, a resumed job or another worker makes
the same prompt for the same sample.

    concepts:
      - name: star
        templates: ["a photo of a {color} {concept} on a {background} background", "a {color} {concept}"]
        attributes: {color: [red, green, blue], background: [striped, dotted]}
        samples: 1000

    concept_for_sample(cfg.concepts[0], seed)   # Concept("star", "a photo of a red {concept} on a ...")
    every_prompt(cfg.concepts[0])               # every expansion, for the preflight's token check

The draw: a template uniformly, then each of its fields' values uniformly, from a generator seeded with
(seed, "prompt", concept). Without `templates` or `prompts` the concept's one `template` is used. Label mode
always uses `template` (the prompt should describe the user's image, not a drawn variation).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

from factory.dataset.config import ConceptConfig, _fields
from factory.dataset.specs import derive_seed
from factory.method.settings import Concept


def has_variety(c: ConceptConfig) -> bool:
    return bool(c.templates or c.prompts)


def _concept(c: ConceptConfig, template: str, values: dict[str, str]) -> Concept:
    # the attribute values go in now; {concept} stays for Concept.prompt to fill (braces in values escaped)
    filled = template.format(
        concept="{concept}", **{k: v.replace("{", "{{").replace("}", "}}") for k, v in values.items()}
    )
    return Concept(c.name, filled, tuple(c.words))


def concept_for_sample(c: ConceptConfig, seed: int) -> tuple[Concept, dict[str, str]]:
    """The sample's concept with its drawn prompt, and the attribute values drawn ({} without attributes)."""
    if not has_variety(c):
        return c.to_concept(), {}
    rng = np.random.default_rng(derive_seed(seed, "prompt", c.name))
    if c.prompts:
        return Concept(c.name, c.prompts[int(rng.integers(len(c.prompts)))], tuple(c.words)), {}
    template = c.templates[int(rng.integers(len(c.templates)))]
    values = {
        f: c.attributes[f][int(rng.integers(len(c.attributes[f])))]
        for f in _fields(template)
        if f != "concept"
    }
    return _concept(c, template, values), values


def every_prompt(c: ConceptConfig) -> Iterator[Concept]:
    """Every prompt a sample of `c` can get (generate mode), then `template`'s (label mode)."""
    for prompt in c.prompts:  # plain prompts have no fields (validated): the template is the prompt
        yield Concept(c.name, prompt, tuple(c.words))
    for template in c.templates:
        fields = [f for f in _fields(template) if f != "concept"]
        for combo in itertools.product(*(c.attributes[f] for f in fields)):
            yield _concept(c, template, dict(zip(fields, combo, strict=True)))
    yield c.to_concept()
