"""Job configuration: one YAML file per job, validated before any work starts.

    cfg = load_config("configs/toyworld.yaml", ["output.uri=/tmp/x", "concepts.0.samples=10"])

`--set KEY=VALUE` overrides use dotted paths (list items by index); values are parsed as YAML scalars.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from factory.method.edges import EdgeMode
from factory.method.masks import MaskRule
from factory.method.readouts import DEFAULT_BACKGROUND_WORDS, READOUTS
from factory.method.schedulers import SchedulerName
from factory.method.settings import AttentionSource, Concept, DistillConfig
from factory.yaml_config import ConfigError, StrictConfig, load_yaml_config, validate_config

MAX_PROMPTS = 100_000  # expanded prompts per concept: the preflight tokenizes every one


class ConceptConfig(StrictConfig):
    """One concept. Its prompt is `template` ("a photo of a {concept}"); for prompt variety in generate
    mode, `templates` (several, with fields such as {color}) and `attributes` (each field's values), or a
    plain list of `prompts`: each sample's prompt is drawn from them by its seed
    (`factory.dataset.prompt_variety`)."""

    name: str = Field(min_length=1)
    template: str = "a photo of a {concept}"
    templates: list[str] = Field(
        default_factory=list,
        description="generate mode: one per sample, drawn by its seed; fields {concept} and the attributes'",
    )
    attributes: dict[str, list[str]] = Field(
        default_factory=dict, description="generate mode: each template field's values, one drawn per sample"
    )
    prompts: list[str] = Field(
        default_factory=list, description="generate mode: whole prompts, one drawn per sample (no fields)"
    )
    words: list[str] = Field(
        default_factory=list, description="words whose attention is summed; default [name]"
    )
    samples: int = Field(100, ge=0, description="synthetic samples to generate (generate mode)")

    @field_validator("template")
    @classmethod
    def _has_slot_or_words(cls, v: str) -> str:
        if "{" in v and "{concept}" not in v:
            raise ValueError("the only template field is {concept}")
        return v

    @model_validator(mode="after")
    def _variety(self) -> ConceptConfig:
        import math

        if self.prompts and (self.templates or self.attributes):
            raise ValueError("give either prompts or templates (with attributes), not both")
        if self.attributes and not self.templates:
            raise ValueError("attributes fill the fields of `templates`; give templates too")
        for name, values in self.attributes.items():
            if name == "concept" or not name.isidentifier():
                raise ValueError(f"attribute {name!r}: a name such as color (not 'concept')")
            if not values or any(not v.strip() for v in values):
                raise ValueError(f"attribute {name!r} needs one or more non-empty values")
        used = set()
        for t in self.templates:
            try:
                fields = set(_fields(t))
            except ValueError as err:
                raise ValueError(f"template {t!r}: {err}") from err
            unknown = fields - {"concept", *self.attributes}
            if unknown:
                raise ValueError(
                    f"template {t!r} has fields {sorted(unknown)} that are not in attributes "
                    f"({sorted(self.attributes) or 'none'}) or {{concept}}"
                )
            used |= fields
        unused = set(self.attributes) - used
        if unused:
            raise ValueError(f"attributes {sorted(unused)} appear in no template")
        for prompt in self.prompts:
            if "{" in prompt or "}" in prompt:
                raise ValueError(f"prompt {prompt!r}: a plain prompt has no fields (use templates)")
        n = len(self.prompts) + sum(
            math.prod(len(self.attributes[f]) for f in _fields(t) if f != "concept") for t in self.templates
        )
        if n > MAX_PROMPTS:
            raise ValueError(f"{n} expanded prompts; at most {MAX_PROMPTS} (the preflight checks every one)")
        return self

    def to_concept(self) -> Concept:
        """The concept with its one `template` (label mode; generate mode without prompt variety)."""
        return Concept(self.name, self.template, tuple(self.words))


def _fields(template: str) -> list[str]:
    """The distinct fields of a format template, in order of first appearance."""
    import string

    return list(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(template) if f is not None))


class SamplerConfig(StrictConfig):
    steps: int = Field(50, ge=1, le=1000)
    guidance_scale: float = 1.0
    negative_prompt: str = ""
    probe_t0: int = Field(40, ge=1)
    probe_repeats: int = Field(1, ge=1)
    attention: AttentionSource = "loop"
    scheduler: SchedulerName = Field(
        "ddim", description="synthesis's sampler (factory/method/schedulers.py); the probe keeps DDIM"
    )
    resolution: int | None = Field(
        None,
        ge=8,
        description="the canvas side in pixels (a multiple of the VAE factor times the denoiser's patch "
        "size); default: the model's native resolution (FLUX.1: 1024)",
    )
    readout: READOUTS.literal() = Field(
        "image_to_text",
        description="the concept map: image_to_text (the paper's attention) or concept_output "
        "(ConceptAttention, FLUX only); factory/method/readouts.py",
    )
    readout_layers: list[int] | None = Field(
        None, description="attention layers to record, by index; default: the readout's own"
    )
    background_words: list[str] = Field(
        list(DEFAULT_BACKGROUND_WORDS),
        min_length=1,
        description="concept_output's other words, against which the concept's softmax is taken",
    )


class MaskConfig(StrictConfig):
    rule: MaskRule = "gmm"
    close_and_fill: bool = False
    edges: EdgeMode = Field(
        "guided", description="guided: snap the refined mask to the image's edges (ours); none: the paper's"
    )
    edge_radius: float = Field(3.0, gt=0, description="the guided filter's radius, in latent cells")
    edge_eps: float = Field(0.01, gt=0, description="the guided filter's eps (larger: smoother edges)")


class InpaintConfig(StrictConfig):
    model: str | None = Field(None, description="the fine-tuned m' for Step 4 (default: the job's model)")
    steps: int = Field(50, ge=1, le=1000)
    scheduler: SchedulerName = "ddim"
    object_guidance: float = 0.0
    background_prompt: str = "a photo of a background"


class FilterConfig(StrictConfig):
    min_area: float = Field(0.0, ge=0.0, le=1.0, description="refined-mask area fraction bounds")
    max_area: float = Field(1.0, ge=0.0, le=1.0)
    min_bimodality: float = Field(0.0, ge=0.0, description="Ashman's D of the attention GMM")
    reject_edgeless: bool = Field(
        True,
        description="with masks.edges: guided, reject a sample whose refined mask the edge snap would erase "
        "(no image edge around it; mostly wrong masks: factory/method/refine.py)",
    )
    keep_rejected: bool = False


class InputConfig(StrictConfig):
    """Label mode's images (factory/dataset/images.py); refine mode's source output."""

    max_pixels: int = Field(
        16_000_000,
        ge=1,
        description="larger images are downscaled to this many pixels (aspect kept) before the model and "
        "written at that size; beyond 16 times it they are not decoded (`too_large`)",
    )
    refine_from: str | None = Field(
        None,
        description="refine mode (`factory refine --from`): the label or generate output (any fsspec URL) "
        "whose images and concept maps are drafted again, with this job's inpaint.model",
    )


class OutputConfig(StrictConfig):
    uri: str = Field(min_length=1, description="any fsspec URL: a local path, s3://bucket/prefix, gs://...")
    storage_options: dict = Field(
        default_factory=dict,
        description="keyword arguments of the fsspec filesystem (e.g. endpoint_url for an S3-compatible "
        "store). Prefer credentials from the environment; values given here are never written out",
    )
    samples_per_shard: int = Field(100, ge=1)
    image_format: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = Field(95, ge=50, le=100)
    prefix: str = Field("shard", pattern=r"^[A-Za-z0-9_.-]+$")
    report_samples: int = Field(16, ge=0)


class ResourcesConfig(StrictConfig):
    actors: int = Field(1, ge=1, description="size of the generation actor pool")
    num_gpus_per_actor: float = Field(0.0, ge=0.0)
    num_cpus_per_actor: float = Field(1.0, gt=0.0)
    batch_size: int = Field(8, ge=1, description="samples per model call inside an actor")
    samples_per_call: int | None = Field(
        None,
        ge=1,
        description="samples an actor produces and hands to a writer task at a time, each committed as one "
        "part of its shard: what a failed call can lose, and what bounds an actor's memory and the objects "
        "it hands on, whatever output.samples_per_shard is. Default: batch_size",
    )
    writer_num_cpus: float = Field(
        0.25, gt=0.0, description="CPU share of each writer task (refine, encode, write)"
    )
    compile: bool = Field(
        False,
        description="torch.compile each actor's UNet (speed only; the first batch pays the compile time, "
        "minutes, once per actor; the image_to_text readout, on every layer or sampler.readout_layers)",
    )
    channels_last: bool = Field(False, description="UNet and VAE in channels_last memory format (speed only)")
    wait_for_actors_s: int | None = Field(
        None,
        gt=0,
        description="start work only once every actor of the pool has loaded its model, and fail "
        "with Ray Data's 'Timed out while starting actors' after this many seconds (the cluster lacks the "
        "resources for the pool). None: start as soon as one actor is up, let the others join when they can "
        "(what an autoscaling cluster wants)",
    )

    @property
    def actor_threads(self) -> int:
        """torch's threads in a generation actor: its CPUs, at least one."""
        return max(1, int(self.num_cpus_per_actor))


class MethodConfig(StrictConfig):
    """The method's settings in a job's keys: the `sampler`, `masks` and `inpaint` sections of a job YAML,
    what `trainers evaluate-masks`, `scheduler-sweep` and `toyworld-tables` take as `--set masks.edges=none`.

    Example:
        >>> method_config(["masks.edges=none", "sampler.steps=20", "sampler.probe_t0=16"]).edges
        'none'
    """

    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    masks: MaskConfig = Field(default_factory=MaskConfig)
    inpaint: InpaintConfig = Field(default_factory=InpaintConfig)

    @model_validator(mode="after")
    def _check_probe(self) -> MethodConfig:
        if self.sampler.probe_t0 > self.sampler.steps:
            raise ValueError(
                f"sampler.probe_t0 ({self.sampler.probe_t0}) exceeds sampler.steps ({self.sampler.steps})"
            )
        return self

    def distill_config(self, **speed) -> DistillConfig:
        """The `DistillConfig` of these sections; `speed`: its compile / channels_last (a job's resources)."""
        s, m, i = self.sampler, self.masks, self.inpaint
        return DistillConfig(
            num_inference_steps=s.steps,
            probe_t0=s.probe_t0,
            probe_repeats=s.probe_repeats,
            mask_rule=m.rule,
            close_and_fill=m.close_and_fill,
            edges=m.edges,
            edge_radius=m.edge_radius,
            edge_eps=m.edge_eps,
            inpaint_steps=i.steps,
            object_guidance=i.object_guidance,
            background_prompt=i.background_prompt,
            guidance_scale=s.guidance_scale,
            negative_prompt=s.negative_prompt,
            attention=s.attention,
            scheduler=s.scheduler,
            inpaint_scheduler=i.scheduler,
            resolution=s.resolution,
            readout=s.readout,
            readout_layers=tuple(s.readout_layers) if s.readout_layers is not None else None,
            background_words=tuple(s.background_words),
            **speed,
        )


def method_config(overrides: list[str] | None = None) -> DistillConfig:
    """The method's settings from the defaults and `--set` overrides in a job's keys (`masks.edges=none`),
    validated as a job's (ConfigError, one line per problem)."""
    cfg = validate_config({}, MethodConfig, overrides, "(--set)")
    if cfg.inpaint.model:
        raise ConfigError("inpaint.model is a job's key; give the fine-tuned m' as --inpaint-model here")
    return cfg.distill_config()


class JobConfig(MethodConfig):
    """A `factory generate` / `factory label` job: one YAML in `configs/`, every field checked before any
    work.

    Sections: `model`, `device`, `dtype`, `seed`, `concepts` (name, template, words, samples), `sampler`
    (steps, guidance, attention source), `masks` (the rule of Steps 2 and 4b), `inpaint` (Step 4), `filters`
    (which samples are rejected), `input` (label mode's image limits), `output` (URI, shard size, image
    format, fsspec storage options) and `resources` (actors, GPUs and CPUs per actor, batch size). Unknown
    fields are errors. docs/factory.md describes each one.

    Example:
        >>> cfg = JobConfig.model_validate({"concepts": [{"name": "star"}], "output": {"uri": "out/x"}})
        >>> cfg.distill_config().num_inference_steps
        50
    """

    model: str = "toyworld"
    # a VAE in place of the model's, e.g. the fp16-fixed SDXL VAE (a diffusers AutoencoderKL folder or hub id)
    vae: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    seed: int = 0
    concepts: list[ConceptConfig] = Field(min_length=1)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    input: InputConfig = Field(default_factory=InputConfig)
    output: OutputConfig
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @model_validator(mode="after")
    def _check(self) -> JobConfig:
        names = [c.name for c in self.concepts]
        if len(set(names)) != len(names):
            raise ValueError(f"concept names must be unique, got {names}")
        if self.filters.min_area > self.filters.max_area:
            raise ValueError("filters.min_area exceeds filters.max_area")
        if self.device == "cuda" and self.resources.num_gpus_per_actor == 0:
            raise ValueError("device: cuda needs resources.num_gpus_per_actor > 0")
        return self

    def distill_config(self) -> DistillConfig:
        return super().distill_config(
            compile=self.resources.compile, channels_last=self.resources.channels_last
        )

    def public_dump(self) -> dict:
        """The config as it may be written out (job.json, logs): storage options and any credentials in a
        URI (`s3://KEY:SECRET@bucket`) replaced by `<redacted>`."""
        d = self.model_dump()
        d["output"]["storage_options"] = {k: "<redacted>" for k in d["output"]["storage_options"]}
        d["output"]["uri"] = redact_uri(d["output"]["uri"])
        d["model"] = redact_uri(d["model"])
        if d["vae"]:
            d["vae"] = redact_uri(d["vae"])
        if d["inpaint"]["model"]:
            d["inpaint"]["model"] = redact_uri(d["inpaint"]["model"])
        return d

    def samples_per_call(self) -> int:
        return self.resources.samples_per_call or self.resources.batch_size

    def actor_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if self.resources.num_gpus_per_actor > 0 else "cpu"


def redact_uri(uri: str) -> str:
    """`scheme://user:secret@host/...` -> `scheme://<redacted>@host/...`; other strings unchanged."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]+@", r"\1<redacted>@", uri)


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """A generation or label job: the YAML at `path` with `--set` overrides applied, validated.

    Args:
        path: the job YAML (see `configs/`).
        overrides: `KEY=VALUE` items by dotted path, as the CLI's `--set` (`"concepts.0.samples=10"`); each
            value is parsed as YAML.

    Returns:
        The validated `JobConfig`.

    Raises:
        ConfigError: the file is missing or not YAML, or the config is invalid; the message lists every
            problem, one line each.

    Example:
        >>> cfg = load_config("configs/toyworld.yaml", ["output.uri=out/x", "concepts.0.samples=10"])
    """
    return load_yaml_config(path, overrides, JobConfig)
