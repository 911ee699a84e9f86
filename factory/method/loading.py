"""Loading a Stable-Diffusion-family pipeline by short name, local directory or Hugging Face hub id.

    pipe = load_pipeline("toyworld")                      # the shipped toyworld model, offline
    pipe = load_pipeline("/models/sd-v1-4", device="cuda") # a local diffusers directory
    pipe = load_pipeline("CompVis/stable-diffusion-v1-4", device="cuda", dtype="fp16")

The families served are in `factory.method.families` (SD 1.x/2.x, SDXL, SD3), detected from the model's
`model_index.json`; any other pipeline is refused with an error that names them. The scheduler is a
DDIMScheduler built from the model's own scheduler config (the paper's sampler), except for rectified-flow
models (SD3), which keep their flow-matching scheduler. The safety checker is not loaded (it would mask
images, and the method needs raw pixels).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from factory.errors import UserError

MODELS_DIR = Path(__file__).parent.parent / "models"  # factory/models: the shipped weights
SHORT_NAMES: dict[str, Path] = {
    "toyworld": MODELS_DIR / "toyworld",  # SD architecture
    "toyworld-dit": MODELS_DIR / "toyworld-dit",  # FLUX.1 architecture (family flux)
}
# Architectures without weights (config files only): built with random weights at load time, for speed and
# memory measurements (`factory bench`); their images and masks are noise.
ARCHITECTURES: dict[str, Path] = {
    "sd15-arch": MODELS_DIR / "sd15-arch",
    "sdxl-arch": MODELS_DIR / "sdxl-arch",
    "sd3-arch": MODELS_DIR / "sd3-arch",
    "flux-arch": MODELS_DIR / "flux-arch",  # FLUX.1-dev (T5's tokenizer: a CLIP vocabulary stands in)
}


class ModelLoadError(UserError, RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


def _not_found(model: str, err: Exception) -> ModelLoadError:
    """The error for a model that is no short name, no local directory, and not on (or cached from) the
    hub."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    hint = (
        "HF_HUB_OFFLINE is set, so the hub was not contacted"
        if offline
        else "the hub could not be reached or has no such repository"
    )
    return ModelLoadError(
        f"could not load model {model!r}: not a short name ({', '.join(SHORT_NAMES)}), not a local "
        f"directory, and {hint}. Download it where the hub is reachable "
        f"(`huggingface-cli download {model} --local-dir DIR`) and pass DIR, or point HF_HOME at a cache "
        f"that holds it. Underlying error: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
    )


# a model folder at an fsspec URL (s3://, gs://, ...) is copied once per machine into this cache
MODEL_CACHE = Path(os.environ.get("CF_MODEL_CACHE", "~/.cache/concept-factory/models")).expanduser()
CONFIG_FILES = (".json", ".txt", ".model", ".jinja")  # configs and tokenizers: what a preflight reads


def is_remote(name: str) -> bool:
    """Whether a model is named by an fsspec URL of another file system (s3://bucket/models/x)."""
    return "://" in name and not name.startswith("file://")


def local_copy(url: str, weights: bool = True) -> str:
    """The model folder at `url` (any fsspec URL; credentials and endpoint as the file system reads them,
    e.g. AWS_* or FSSPEC_S3_ENDPOINT_URL) copied to this machine's cache (`CF_MODEL_CACHE`), once per
    machine and content: the folder is named by the URL and its listing (names, sizes, ETags), so a new
    export at the same URL is copied anew. `weights=False` copies the configs and tokenizers alone (what
    the preflight reads, not gigabytes). One process copies, the others on the machine wait for it
    (a file lock); the copy appears whole or not at all (a rename)."""
    import hashlib
    import json
    import shutil

    import fsspec
    from filelock import FileLock

    try:
        fs, root = fsspec.core.url_to_fs(url)
        root = root.rstrip("/")
        listing = fs.find(root, detail=True)
    except Exception as err:  # noqa: BLE001  (any file system's error: missing bucket, no credentials)
        raise ModelLoadError(f"could not list model folder {url!r}: {type(err).__name__}: {err}") from err
    files = {p: d for p, d in listing.items() if weights or p.endswith(CONFIG_FILES)}
    if not files:
        raise ModelLoadError(f"model folder {url!r} is empty or does not exist")
    version = {p: str(d.get("ETag") or d.get("etag") or d.get("mtime")) for p, d in files.items()}
    stamp = json.dumps(sorted((p, d.get("size"), version[p]) for p, d in files.items()))
    key = hashlib.sha256(f"{url}\n{weights}\n{stamp}".encode()).hexdigest()[:16]
    dest = MODEL_CACHE / f"{root.rsplit('/', 1)[-1]}-{key}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if not dest.exists():
            partial = dest.with_name(dest.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            for p in files:
                target = partial / p[len(root) + 1 :]
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(p, str(target))
            partial.rename(dest)
    return str(dest)


def resolve_model(name_or_path: str, weights: bool = True) -> str:
    """A short name's directory, an existing local directory, a remote folder's local copy (`local_copy`;
    `weights=False`: its configs and tokenizers alone), or else the string itself (a hub id)."""
    if is_remote(name_or_path):
        return local_copy(name_or_path, weights)
    if name_or_path in ARCHITECTURES:
        return str(ARCHITECTURES[name_or_path])
    if name_or_path in SHORT_NAMES:
        path = SHORT_NAMES[name_or_path]
        if not (path / "model_index.json").exists():
            raise ModelLoadError(
                f"the {name_or_path!r} model's weights are missing from {path}. They ship with the "
                f"repository; restore them with `git checkout -- {path}` or retrain with "
                f"`trainers pretrain-{name_or_path}`."
            )
        return str(path)
    path = Path(os.path.expanduser(name_or_path))
    looks_like_a_path = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
    if looks_like_a_path and not path.exists():
        raise ModelLoadError(
            f"model directory {name_or_path!r} does not exist (a hub id looks like 'org/name'). Give the "
            "folder of a diffusers pipeline, as `save_pretrained` writes it, that every node can read."
        )
    if path.exists():
        if not (path / "model_index.json").exists():
            raise ModelLoadError(
                f"{path} exists but is not a diffusers pipeline directory (no model_index.json). Convert a "
                "single-file checkpoint with diffusers' `StableDiffusionPipeline.from_single_file(...)"
                ".save_pretrained(dir)` and pass that directory."
            )
        return str(path)
    return name_or_path


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16 or auto")
    return table[dtype]


def quiet_model_libraries(verbose: bool) -> None:
    """In a process that loads models (an actor, a training worker): diffusers' and transformers' loading bars
    and INFO/WARNING lines off, unless verbose."""
    if verbose:
        return
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_pipeline(
    model: str,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    arch_overrides: dict[str, dict] | None = None,
):
    """Load a text-to-image latent diffusion pipeline of a served family, ready for `Distiller`.

    Args:
        model: a short name (`"toyworld"`, shipped in `factory/models/`), a local diffusers pipeline directory
            or a hub id (hub ids need the hub or a cache that holds them; `HF_HUB_OFFLINE=1` never asks).
        device: `"cpu"`, `"cuda"` or `"cuda:N"`.
        dtype: `"fp32"`, `"fp16"`, `"bf16"`, `"auto"` or None (fp16 on CUDA, fp32 on the CPU).

    Returns:
        The diffusers pipeline on `device`, its progress bar off and without a safety checker.

    Raises:
        ModelLoadError: the model cannot be found or is not a text-conditioned latent diffusion pipeline; the
            message says what to do.
        UnsupportedFamilyError: the pipeline is of a family the factory does not serve (the message names
            the ones it does).

    Example:
        >>> pipe = load_pipeline("toyworld")
        >>> type(pipe.scheduler).__name__
        'DDIMScheduler'
    """
    from diffusers import DDIMScheduler

    from factory.method.schedulers import is_flow

    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device {device!r} was requested but CUDA is not available on this machine; "
            "use device='cpu' (slow, fp32) or run on a GPU node"
        )
    torch_dtype = resolve_dtype(dtype, device)
    if device == "cpu" and torch_dtype == torch.float16:
        raise ModelLoadError(
            "fp16 on the CPU is not supported by most kernels; use fp32 (or bf16) on the CPU"
        )
    source = resolve_model(model)
    if arch_overrides and model not in ARCHITECTURES:
        raise ModelLoadError(
            f"architecture overrides apply to the shipped architectures ({', '.join(ARCHITECTURES)}), not to "
            f"{model!r}"
        )
    if model in ARCHITECTURES:  # on the shipped noise schedule
        pipe = build_random_pipeline(source, device, torch_dtype, overrides=arch_overrides)
    else:
        pipe = _from_pretrained(model, source, torch_dtype)
    if not is_flow(pipe.scheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe


def _from_pretrained(model: str, source: str, torch_dtype: torch.dtype):
    """The pipeline of a served family from a directory or the hub, with every component its family needs."""
    from diffusers import DiffusionPipeline

    from factory.method.families import detect_family

    index = read_model_configs(model, components=())["model_index"]  # a served family, before any weights
    kwargs = {"dtype": torch_dtype}
    if "safety_checker" in index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    for name in ("text_encoder_3", "tokenizer_3"):  # SD3 without T5, as `save_pretrained` wrote it
        if "transformer" in index and None in index.get(name, [None]):
            kwargs[name] = None
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        if Path(source).is_dir():
            raise ModelLoadError(
                f"could not load the pipeline in {source}: {type(err).__name__}: "
                f"{str(err).splitlines()[0][:300]}. Is the folder complete (every component's config and "
                "weights, as `save_pretrained` writes them) and readable on this node?"
            ) from err
        raise _not_found(model, err) from err
    family = detect_family(pipe)
    present = {c for c in family.required_components if getattr(pipe, c, None) is not None}
    _check_components(model, type(pipe).__name__, type(family), present)
    return pipe


def _check_components(model: str, pipeline: str, family, present: set[str]) -> None:
    """ModelLoadError naming what a pipeline of `family` lacks of the components it needs."""
    missing = [c for c in family.required_components if c not in present]
    if missing:
        raise ModelLoadError(
            f"{model!r} is a {pipeline} without {', '.join(missing)}; concept distillation with a "
            f"{family.name} model needs {', '.join(family.required_components)}"
        )


def build_random_pipeline(
    source: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    overrides: dict[str, dict] | None = None,
):
    """The pipeline of the architecture whose config files are in `source` (`model_index.json` and one
    folder per component), with random weights (seeded): each component is built from its config as
    diffusers' fast tests build theirs, and the pipeline class is the one `model_index.json` names.

    overrides: {component: {config key: value}} changed before building, e.g. a depth-reduced FLUX for the
    CPU, `{"transformer": {"num_layers": 2}, "text_encoder_2": {"num_layers": 1}}` (`factory bench
    --arch-set`); an unknown component or key is an error, not a silent no-op."""
    import json

    import diffusers
    import transformers

    index = json.loads((Path(source) / "model_index.json").read_text())
    overrides = overrides or {}
    unknown = [c for c in overrides if not isinstance(index.get(c), list) or index[c][1] is None]
    if unknown:
        raise ModelLoadError(f"no component {', '.join(unknown)} in {source} to override")

    def overridden(name: str, config: dict) -> dict:
        missing = [k for k in overrides.get(name, {}) if k not in config]
        if missing:
            raise ModelLoadError(f"{name}'s config has no key {', '.join(missing)} to override")
        return {**config, **overrides.get(name, {})}

    torch.manual_seed(seed)
    components = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue
        library, cls_name = entry
        if cls_name is None:
            components[name] = None
            continue
        cls = getattr(diffusers if library == "diffusers" else transformers, cls_name)
        if name.startswith("tokenizer"):
            components[name] = transformers.AutoTokenizer.from_pretrained(source, subfolder=name)
        elif name == "scheduler":
            components[name] = cls.from_config(cls.load_config(source, subfolder=name))
        elif library == "diffusers":
            config = overridden(name, dict(cls.load_config(source, subfolder=name)))
            with torch.device(device):  # initialise where the weights will live (seconds on a GPU)
                components[name] = cls.from_config(config)
        else:
            config = transformers.AutoConfig.from_pretrained(source, subfolder=name)
            config = type(config).from_dict(overridden(name, config.to_dict()))
            with torch.device(device):
                components[name] = cls(config)
        if isinstance(components[name], torch.nn.Module):
            if dtype != torch.float32:
                components[name].to(dtype)
            components[name].eval()
    pipeline_cls = getattr(diffusers, index["_class_name"])
    if "safety_checker" in index:
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipeline_cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _vae_source(vae: str) -> tuple[str, str | None]:
    source = os.path.expanduser(vae)
    return source, "vae" if (Path(source) / "vae" / "config.json").exists() else None


def _vae_error(vae: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load the VAE {vae!r}: {type(err).__name__}: {str(err).splitlines()[0][:300]}. "
        "Give a diffusers AutoencoderKL folder (config.json and weights) or a reachable hub id."
    )


def read_vae_config(vae: str) -> dict:
    """The config of a VAE given in place of the model's, read without its weights (the preflight)."""
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.load_config(*_vae_source(vae))
    except (OSError, ValueError) as err:
        raise _vae_error(vae, err) from err


def load_vae(vae: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A VAE to use instead of the model's (an `AutoencoderKL` directory, a pipeline directory with a vae/
    folder, or a hub id), e.g. `madebyollin/sdxl-vae-fp16-fix`."""
    from diffusers import AutoencoderKL

    source, subfolder = _vae_source(vae)
    try:
        return AutoencoderKL.from_pretrained(source, subfolder=subfolder, torch_dtype=dtype).to(device)
    except (OSError, ValueError) as err:
        raise _vae_error(vae, err) from err


def model_id(model: str) -> str:
    """A stable identifier for metadata: the short name or hub id as given, or the directory's name."""
    return model if model in SHORT_NAMES or not Path(model).exists() else Path(model).resolve().name


def read_model_configs(model: str, components: tuple[str, ...] = ("denoiser", "vae")) -> dict:
    """The model's `model_index.json`, its family and its components' configs, read without any weights.

    Args:
        components: which configs to read: "denoiser" (the UNet's or SD3 transformer's, also under its own
            name), "vae".

    Returns:
        {"model_index": ..., "family": a `FAMILIES` name, "denoiser": ..., "vae": ...}

    Raises:
        ModelLoadError: the model cannot be found, or lacks a component its family needs.
        UnsupportedFamilyError: a pipeline of a family the factory does not serve; the message names them.
    """
    import diffusers
    from diffusers import DiffusionPipeline

    from factory.method.families import FAMILIES, component_classes, family_name_of_index

    source = resolve_model(model, weights=False)
    try:
        with warnings.catch_warnings():  # diffusers passes huggingface_hub an argument it deprecated
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            index = DiffusionPipeline.load_config(source)
    except (OSError, ValueError) as err:
        raise _not_found(model, err) from err
    family = FAMILIES[family_name_of_index(index, repr(model))]
    _check_components(model, index.get("_class_name", "pipeline"), family, set(component_classes(index)))
    out = {"model_index": index, "family": family.name}
    classes = {family.denoiser_name: family.denoiser_class, "vae": "AutoencoderKL"}
    try:
        for c in components:
            name = family.denoiser_name if c == "denoiser" else c
            out[c] = getattr(diffusers, classes[name]).load_config(source, subfolder=name)
            out[name] = out[c]
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not read the {c} config of model {model!r}: {err}. Pass a diffusers pipeline "
            "directory, a short name or a reachable hub id."
        ) from err
    return out


TEXT_WIDTH_KEYS = ("cross_attention_dim", "joint_attention_dim", "cap_feat_dim")  # UNet; SD3/FLUX; Z-Image


def check_inpaint_fits(model: str, inpaint_model: str, base: dict, inpaint: dict) -> None:
    """A fine-tuned m' (`inpaint.model`) fits the model when its denoiser (config `inpaint`) is of the same
    class (where the configs name it: read from files, not from a loaded module) and reads text features as
    wide as the model's denoiser (config `base`): the model's text encoders condition it."""
    classes = base.get("_class_name"), inpaint.get("_class_name")
    key = next((k for k in TEXT_WIDTH_KEYS if base.get(k) is not None), None)
    if (None not in classes and classes[0] != classes[1]) or (key and inpaint.get(key) != base.get(key)):
        raise ModelLoadError(
            f"inpaint.model {inpaint_model!r} does not fit model {model!r}: its denoiser "
            f"({classes[1] or 'loaded'}) reads text features of width {inpaint.get(key)}, the model's "
            f"({classes[0] or 'loaded'}) {base.get(key)}. Fine-tune m' from this model (`trainers "
            "finetune`), or name the model it was fine-tuned from."
        )


LORA_FOLDER = "lora"  # a LoRA run's adapters in its export (`trainers finetune`)
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file diffusers' `save_lora_adapter` writes


def lora_adapter_folder(inpaint_model: str) -> Path | None:
    """The folder of the LoRA adapter that `inpaint_model` names, or None where it names a pipeline (a
    directory with `model_index.json`, a short name or a hub id): a LoRA run's export (`lora/` beside or
    without its fused pipeline, `output.fused`) or that `lora/` folder itself. A pipeline folder is loaded
    whole even when it holds `lora/` too."""
    if is_remote(inpaint_model):  # looked at where it is; copied only if it is an adapter
        import fsspec

        fs, root = fsspec.core.url_to_fs(inpaint_model.rstrip("/"))
        if fs.exists(f"{root}/model_index.json"):
            return None
        if not any(fs.exists(f"{d}/{LORA_WEIGHTS}") for d in (f"{root}/{LORA_FOLDER}", root)):
            return None
        inpaint_model = local_copy(inpaint_model)
    path = Path(os.path.expanduser(inpaint_model))
    if not path.is_dir() or (path / "model_index.json").exists():
        return None
    return next((d for d in (path / LORA_FOLDER, path) if (d / LORA_WEIGHTS).exists()), None)


def adapter_denoiser_config(adapter: Path) -> dict | None:
    """The config of the denoiser an adapter was trained on, from its export's `finetune.json` (beside the
    adapter or one folder up); None where it has none (an adapter from elsewhere)."""
    import json

    for f in (adapter / "finetune.json", adapter.parent / "finetune.json"):
        if f.exists():
            return json.loads(f.read_text()).get("denoiser")
    return None


def check_adapter_fits(model: str, inpaint_model: str, base: dict, trained_on: dict | None) -> None:
    """A LoRA adapter fits the model when the denoiser it was trained on (its export's record) has the
    model's denoiser's class and config: the adapter adds to the model's own weights, so a denoiser of
    another depth or width would take some of it, or none. Checked from config files, before any weights."""
    if trained_on is None:
        return  # an adapter without a record: `load_inpaint_denoiser` checks that every tensor found a layer

    def norm(d: dict) -> dict:
        import json

        return {k: json.loads(json.dumps(v, default=str)) for k, v in d.items() if not k.startswith("_")}

    a, b = norm(base), norm(trained_on)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    classes = base.get("_class_name"), trained_on.get("_class_name")
    if differ or (None not in classes and classes[0] != classes[1]):
        shown = (
            ", ".join(f"{k} {b.get(k)!r} against {a.get(k)!r}" for k in differ[:3]) or f"class {classes[1]}"
        )
        raise ModelLoadError(
            f"inpaint.model {inpaint_model!r} is a LoRA adapter of another denoiser than model {model!r}'s "
            f"({shown}): an adapter is loaded on the model it was fine-tuned from; set model to that one, or "
            "use a fused export (`trainers finetune` with output.fused: true)."
        )


def load_inpaint_denoiser(model: str, inpaint_model: str, family):
    """The denoiser of the fine-tuned m' (`inpaint.model`) beside the model's own (`family`'s): a pipeline
    directory's denoiser, of the model's denoiser's class; or a LoRA adapter (`lora_adapter_folder`) fused
    into a copy of the model's denoiser (the same memory as a whole m'; the disk and the download are the
    adapter's megabytes). Fit checks as the preflight's (`check_inpaint_fits`, `check_adapter_fits`)."""
    import copy

    base, name = family.denoiser_module, family.denoiser_name
    adapter = lora_adapter_folder(inpaint_model)
    if adapter is None:
        try:  # m' is a pipeline directory: its denoiser, of the model's denoiser's class
            module = (
                type(base)
                .from_pretrained(resolve_model(inpaint_model), subfolder=name, torch_dtype=base.dtype)
                .to(base.device)
            )
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"could not load the inpainting model {inpaint_model!r}'s {name}: {err}"
            ) from err
        check_inpaint_fits(model, inpaint_model, dict(base.config), dict(module.config))
        return module
    from safetensors.torch import load_file

    check_adapter_fits(model, inpaint_model, dict(base.config), adapter_denoiser_config(adapter))
    tensors = len(load_file(str(adapter / LORA_WEIGHTS)))
    module = copy.deepcopy(base)
    module.load_lora_adapter(str(adapter), prefix=None, adapter_name="inpaint", weight_name=LORA_WEIGHTS)
    placed = sum(1 for n, _ in module.named_parameters() if ".lora_" in n)
    if placed != tensors:
        raise ModelLoadError(
            f"inpaint.model {inpaint_model!r}: {tensors - placed} of the LoRA adapter's {tensors} tensors "
            f"name no layer of model {model!r}'s {name}: it was trained on another model; use that one."
        )
    module.fuse_lora()
    module.unload_lora()
    return module


def load_tokenizers(model: str) -> dict:
    """The model's tokenizers alone (no weights), {component name: tokenizer}, each of the class its
    `model_index.json` names (FLUX.2-dev's is a processor around its tokenizer): what the preflight checks
    the prompts with (`families.SDFamily.over_tokenizers`)."""
    import transformers

    configs = read_model_configs(model, components=())
    index = configs["model_index"]
    names = [n for n in ("tokenizer", "tokenizer_2", "tokenizer_3") if n in index and None not in index[n]]
    try:
        return {
            n: getattr(transformers, index[n][1], transformers.AutoTokenizer).from_pretrained(
                resolve_model(model, weights=False), subfolder=n
            )
            for n in names
        }
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not read the tokenizers of model {model!r}: {err}") from err


def model_geometry(model: str) -> tuple[int, int]:
    """(native resolution in pixels, VAE downsampling factor) from the model's configs alone, no weights."""
    configs = read_model_configs(model)
    factor = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    if "sample_size" in configs["denoiser"]:  # a UNet's or SD3 transformer's, in latent cells
        return int(configs["denoiser"]["sample_size"]) * factor, factor
    # FLUX's and Z-Image's transformers have none: the VAE's (FluxFamily.native_resolution), else the
    # pipeline's default of 128 latent cells
    return int(configs["vae"].get("sample_size") or 128 * factor), factor
