"""Loading a Stable-Diffusion-family pipeline by short name, local directory or Hugging Face hub id.

    pipe = load_pipeline("toyworld")                      # the shipped toyworld model, offline
    pipe = load_pipeline("/models/sd-v1-4", device="cuda") # a local diffusers directory
    pipe = load_pipeline("CompVis/stable-diffusion-v1-4", device="cuda", dtype="fp16")

The scheduler is always a DDIMScheduler built from the model's own scheduler config (the paper's sampler),
and the safety checker is not loaded (it would mask images, and the method needs raw pixels).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from factory.errors import UserError

MODELS_DIR = Path(__file__).parent.parent / "models"  # factory/models: the shipped weights
SHORT_NAMES: dict[str, Path] = {"toyworld": MODELS_DIR / "toyworld"}
# Architectures without weights (config files only): built with random weights at load time, for speed and
# memory measurements (`factory bench`); their images and masks are noise.
ARCHITECTURES: dict[str, Path] = {"sd15-arch": MODELS_DIR / "sd15-arch"}
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


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


def resolve_model(name_or_path: str) -> str:
    """A short name's directory, an existing local directory, or else the string itself (a hub id)."""
    if name_or_path in ARCHITECTURES:
        return str(ARCHITECTURES[name_or_path])
    if name_or_path in SHORT_NAMES:
        path = SHORT_NAMES[name_or_path]
        if not (path / "model_index.json").exists():
            raise ModelLoadError(
                f"the {name_or_path!r} model's weights are missing from {path}. They ship with the "
                f"repository; restore them with `git checkout -- {path}` or retrain with "
                "`trainers pretrain-toyworld`."
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


def load_pipeline(model: str, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None):
    """Load a text-to-image latent diffusion pipeline with a DDIM scheduler, ready for `Distiller`.

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

    Example:
        >>> pipe = load_pipeline("toyworld")
        >>> type(pipe.scheduler).__name__
        'DDIMScheduler'
    """
    from diffusers import DDIMScheduler, DiffusionPipeline

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
    if model in ARCHITECTURES:
        return build_random_pipeline(source, device, torch_dtype)  # DDIM on the shipped noise schedule
    kwargs = {"dtype": torch_dtype, "safety_checker": None, "requires_safety_checker": False}
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
    missing = [c for c in REQUIRED_COMPONENTS if getattr(pipe, c, None) is None]
    if missing:
        raise ModelLoadError(
            f"{model!r} is a {type(pipe).__name__} without {', '.join(missing)}; concept "
            "distillation needs a text-conditioned latent diffusion model (SD v1/v2 family)"
        )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe


def build_random_pipeline(
    source: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
):
    """A StableDiffusionPipeline of the architecture whose config files are in `source`, with random weights
    (seeded): the components are built from their configs as diffusers' fast tests build theirs."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    with torch.device(device):  # initialise where the weights will live (seconds on a GPU for 860M)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(source, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(source, subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(source, subfolder="text_encoder"))
    for module in (unet, vae, text_encoder):
        module.to(dtype).eval()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=AutoTokenizer.from_pretrained(source, subfolder="tokenizer"),
        unet=unet,
        scheduler=DDIMScheduler.from_config(DDIMScheduler.load_config(source, subfolder="scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_id(model: str) -> str:
    """A stable identifier for metadata: the short name or hub id as given, or the directory's name."""
    return model if model in SHORT_NAMES or not Path(model).exists() else Path(model).resolve().name


def read_model_configs(model: str, components: tuple[str, ...] = ("unet", "vae")) -> dict:
    """The model's `model_index.json` and its components' configs, read without loading any weights.

    Raises:
        ModelLoadError: the model cannot be found, or is not a text-conditioned latent diffusion pipeline of
            the kind the factory serves (`REQUIRED_COMPONENTS`, a `UNet2DConditionModel`).
    """
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel

    source = resolve_model(model)
    try:
        with warnings.catch_warnings():  # diffusers passes huggingface_hub an argument it deprecated
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            index = DiffusionPipeline.load_config(source)
    except (OSError, ValueError) as err:
        raise _not_found(model, err) from err
    missing = [
        c for c in REQUIRED_COMPONENTS if not isinstance(index.get(c), (list, tuple)) or None in index[c]
    ]
    if missing:
        raise ModelLoadError(
            f"{model!r} is a {index.get('_class_name', 'pipeline')} without {', '.join(missing)}; concept "
            "distillation needs a text-conditioned latent diffusion model with a UNet (the SD v1/v2 family)"
        )
    if index["unet"][1] != "UNet2DConditionModel":
        raise ModelLoadError(
            f"{model!r}'s denoiser is a {index['unet'][1]}; the factory serves pipelines whose UNet is a "
            "UNet2DConditionModel (Stable Diffusion v1/v2 and the embedded toyworld model)"
        )
    out = {"model_index": index}
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}
    try:
        for c in components:
            out[c] = classes[c].load_config(source, subfolder=c)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not read the {c} config of model {model!r}: {err}. Pass a diffusers pipeline "
            "directory, a short name or a reachable hub id."
        ) from err
    return out


def load_tokenizer(model: str):
    """The model's tokenizer alone (no weights): what the preflight checks the prompts with."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model(model), subfolder="tokenizer")
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not read the tokenizer of model {model!r}: {err}") from err


def model_geometry(model: str) -> tuple[int, int]:
    """(native resolution in pixels, VAE downsampling factor) from the model's configs alone, no weights."""
    configs = read_model_configs(model)
    factor = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    return int(configs["unet"]["sample_size"]) * factor, factor
