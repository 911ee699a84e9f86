"""The preflight: everything a job needs that can be checked on the driver before Ray starts.

On a cluster a mistake found inside a generation actor is found after the GPU nodes have been scaled up;
these checks find it first, in seconds, without loading any weights:

1. the output URI: its fsspec protocol is installed (the message names the extra to install), it holds no
   other job's shards, and a probe object can be written and removed there;
2. the model and the inpainting model: they resolve (short name, local directory, or a hub id that can be
   reached or is cached), their configs read, and they are text-conditioned latent diffusion pipelines of a
   family the factory serves; the inpainting model fits the model's text encoder;
3. every concept's prompt: the tokenizer finds each concept word's tokens in it, and the background prompt
   tokenizes;
4. refine mode's source output: complete, and made by the same model, VAE and resolution, of the job's
   concepts.

First of all, the edge mode's packages (`masks.edges: guided` needs OpenCV's contrib modules).

Each failure raises a `UserError` subclass whose message says what to do.
"""

from __future__ import annotations

import uuid

from factory.dataset.config import JobConfig
from factory.errors import UserError
from factory.method.edges import check_edges_available
from factory.yaml_config import ConfigError

# fsspec protocol -> the extra of this package that installs it
PROTOCOL_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


class OutputError(UserError):
    """The output URI cannot be used: a missing fsspec implementation, no write access, another job."""


def output_filesystem(uri: str, storage_options: dict | None = None):
    """`fsspec.core.url_to_fs(uri)`, with an actionable error when the protocol's package is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except ImportError as err:
        proto = uri.split("://", 1)[0]
        extra = PROTOCOL_EXTRAS.get(proto)
        hint = f"pip install 'concept-factory[{extra}]'" if extra else f"install fsspec's {proto!r} package"
        raise OutputError(
            f"output.uri {uri!r} needs the {proto}:// filesystem, which is not installed: {hint}"
        ) from err
    except ValueError as err:
        raise OutputError(f"output.uri {uri!r} is not a URL fsspec knows: {err}") from err


def check_writable(uri: str, storage_options: dict | None = None) -> None:
    """Write a probe object into the output folder and remove it again."""
    fs, root = output_filesystem(uri, storage_options)
    probe = f"{root.rstrip('/')}/.factory-probe-{uuid.uuid4().hex[:12]}"
    try:
        fs.makedirs(root, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"concept-factory write probe\n")
        fs.rm(probe)
    except (OSError, PermissionError) as err:
        raise OutputError(
            f"cannot write to output.uri {uri!r}: {type(err).__name__}: {err}. Choose a folder or bucket "
            "this machine (and every node of the cluster) can write, or fix its permissions or credentials."
        ) from err


def check_model(cfg: JobConfig) -> None:
    """The model's and the inpainting model's configs read, and they are of a family the factory serves
    (`factory.method.families`)."""
    from factory.method.families import FAMILIES
    from factory.method.loading import (
        ModelLoadError,
        adapter_denoiser_config,
        check_adapter_fits,
        check_inpaint_fits,
        lora_adapter_folder,
        read_model_configs,
    )

    configs = read_model_configs(cfg.model)
    family = FAMILIES[configs["family"]]
    family.check_sampler(cfg.sampler.scheduler)
    family.check_sampler(cfg.inpaint.scheduler)
    family.check_readout(cfg.sampler.readout)
    if cfg.inpaint.model is not None:
        if not family.finetuned_inpainting:
            served = [n for n, f in FAMILIES.items() if f.finetuned_inpainting]
            raise ModelLoadError(
                f"inpaint.model is set, but model {cfg.model!r} is a {family.name} model: a fine-tuned m' "
                f"is served for the families {', '.join(served)}. Leave inpaint.model unset."
            )
        adapter = lora_adapter_folder(cfg.inpaint.model)
        if adapter is not None:  # a LoRA run's adapter, loaded on the model
            check_adapter_fits(
                cfg.model, cfg.inpaint.model, dict(configs["denoiser"]), adapter_denoiser_config(adapter)
            )
        else:
            inpaint = read_model_configs(cfg.inpaint.model, components=("denoiser",))
            check_inpaint_fits(
                cfg.model, cfg.inpaint.model, dict(configs["denoiser"]), dict(inpaint["denoiser"])
            )
    if cfg.vae is not None:
        from factory.method.loading import read_vae_config

        read_vae_config(cfg.vae)


def check_prompts(cfg: JobConfig) -> None:
    """Every concept's prompt holds its concept words' tokens within the text tokens that reach the model,
    found as the model's family finds them (`token_weights`, over the model's tokenizers alone: each of
    them, in the chat-templated prompt where the family templates it): every expansion of its templates and
    attributes, or each of its listed prompts (`prompt_variety`)."""
    from factory.dataset.prompt_variety import every_prompt
    from factory.method.families import FAMILIES
    from factory.method.loading import load_tokenizers, read_model_configs
    from factory.method.prompts import ConceptTokenError

    family = FAMILIES[read_model_configs(cfg.model, components=())["family"]]
    text = family.over_tokenizers(load_tokenizers(cfg.model))
    for c in cfg.concepts:
        for concept in every_prompt(c):  # each template with each attribute value, or each listed prompt
            try:
                text.token_weights([concept.prompt], [list(concept.token_words)])
            except ConceptTokenError as err:
                raise PromptError(f"concept {c.name!r}: {err}") from err


class PromptError(UserError):
    """A concept's prompt does not hold its concept words' tokens."""


def check_not_another_job(cfg: JobConfig, mode: str) -> None:
    """Refuse an output folder whose job.json records a different job (model, prompts, sampler, ...)."""
    import json

    from factory.dataset.specs import job_fingerprint

    fs, root = output_filesystem(cfg.output.uri, cfg.output.storage_options)
    path = f"{root.rstrip('/')}/job.json"
    if not fs.exists(path):
        return
    with fs.open(path, "r") as f:
        old = json.load(f)
    if (old.get("fingerprint"), old.get("mode")) != (job_fingerprint(cfg), mode):
        raise OutputError(
            f"{cfg.output.uri} already holds shards of a different job (its job.json differs in model, "
            "prompts, sampler, masks, filters or format). Use a new output.uri, or delete the old shards "
            "to start over."
        )


def check_refine_source(cfg: JobConfig, mode: str) -> None:
    """Refine mode's source (`input.refine_from`): a complete label or generate output whose concept maps
    this job can use: made by the same model (the maps are its attention, the latents its VAE's) at the
    same resolution, of concepts this job names."""
    from factory.dataset.shards import ShardStore

    source = cfg.input.refine_from
    if (mode == "refine") != (source is not None):
        raise ConfigError(
            "input.refine_from is refine mode's source: `factory refine CONFIG --from OUTPUT` sets it"
            if source is not None
            else "refine mode needs its source output (`factory refine CONFIG --from OUTPUT`)"
        )
    if source is None:
        return
    store = ShardStore(source, cfg.output.storage_options)
    try:
        manifest, job = store.read_json("manifest.json"), store.read_json("job.json")
    except FileNotFoundError as err:
        raise OutputError(f"--from {source!r} holds no factory output (no manifest.json, job.json)") from err
    if not manifest.get("complete"):
        raise OutputError(f"--from {source!r} is not complete: run its job to the end first")
    made = job["config"]
    differ = [
        f"{what} {a!r} (the source's {b!r})"
        for what, a, b in (
            ("model", cfg.model, made.get("model")),
            ("vae", cfg.vae, made.get("vae")),
            ("sampler.resolution", cfg.sampler.resolution, made.get("sampler", {}).get("resolution")),
        )
        if a != b
    ]
    missing = sorted({c["name"] for c in made["concepts"]} - {c.name for c in cfg.concepts})
    if differ or missing:
        raise ConfigError(
            f"--from {source!r} was made otherwise: "
            + "; ".join(differ + ([f"concepts {missing} not in this job"] if missing else []))
            + ". Refine an output with the job's model, VAE, resolution and concepts (the concept maps are "
            "that model's)."
        )


def preflight(cfg: JobConfig, mode: str, write_probe: bool = True) -> None:
    """All the checks above, in order; raises the first failure. `write_probe=False` writes nothing (a dry
    run)."""
    check_edges_available(cfg.masks.edges)
    check_refine_source(cfg, mode)
    check_not_another_job(cfg, mode)
    if write_probe:
        check_writable(cfg.output.uri, cfg.output.storage_options)
    check_model(cfg)
    check_prompts(cfg)
