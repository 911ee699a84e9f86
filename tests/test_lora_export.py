"""A LoRA run's export as the adapter alone (`output.fused: false`, issue 34): `inpaint.model` loads it on
top of the job's model, as it loads a fused pipeline folder; the preflight and the Distiller refuse an
adapter of another denoiser. No Ray: the export is made from a checkpoint folder written as a run writes it
(state.json and the EMA's adapter tensors), so the test is the export and the loading, not the training."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import BUILDERS

from factory.dataset.config import load_config
from factory.dataset.preflight import check_model
from factory.method.distiller import Distiller
from factory.method.families import detect_family
from factory.method.loading import ModelLoadError, lora_adapter_folder
from factory.method.settings import Concept, DistillConfig, SampleSpec
from trainers.finetune.config import LoraConfig, load_finetune_config
from trainers.finetune.train import export_pipeline
from trainers.finetune.worker import EMA_FILE, STATE_FILE, add_lora

CONFIG = DistillConfig(num_inference_steps=3, probe_t0=2, inpaint_steps=3, resolution=32)


def _lora_checkpoint(pipe, folder, seed: int = 0):
    """A checkpoint of a LoRA run on `pipe`'s denoiser: adapters with non-zero B (a trained run's), as the
    EMA file holds them."""
    module = detect_family(pipe).denoiser_module
    lora = LoraConfig(rank=4)
    add_lora(module, lora)
    g = torch.Generator().manual_seed(seed)
    ema = {}
    for n, p in module.named_parameters():
        if ".lora_" in n:
            ema[n] = torch.randn(p.shape, generator=g) * 0.5
    folder.mkdir(parents=True)
    save_file(ema, str(folder / EMA_FILE))
    (folder / STATE_FILE).write_text(json.dumps({"step": 7, "lora": lora.model_dump()}))
    module.unload_lora()  # the base as it was
    return folder


def _exports(d, build: str):
    """`build`'s tiny pipeline in d/base, and one LoRA checkpoint exported alone and fused."""
    BUILDERS[build]().save_pretrained(d / "base")
    ckpt = _lora_checkpoint(BUILDERS[build](), d / "checkpoint")
    export_pipeline(str(d / "base"), str(ckpt), str(d / "adapter"), fused=False)
    export_pipeline(str(d / "base"), str(ckpt), str(d / "fused"), fused=True)
    return d


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return _exports(tmp_path_factory.mktemp("lora-export"), "flux")


@pytest.fixture(scope="module", params=["flux", "sd2", "z_image"])
def exported(request, flux, tmp_path_factory):
    """A double-stream DiT, a UNet, a single-stream DiT."""
    if request.param == "flux":
        return flux
    return _exports(tmp_path_factory.mktemp(f"lora-export-{request.param}"), request.param)


def test_an_adapter_alone_is_megabytes_and_records_its_denoiser(flux):
    adapter, fused = flux / "adapter", flux / "fused"
    assert not (adapter / "model_index.json").exists() and (fused / "model_index.json").exists()
    assert (adapter / "lora" / "pytorch_lora_weights.safetensors").exists()
    record = json.loads((adapter / "finetune.json").read_text())
    assert record["denoiser"]["_class_name"] == "FluxTransformer2DModel" and record["step"] == 7
    size = sum(p.stat().st_size for p in adapter.rglob("*") if p.is_file())
    assert size < sum(p.stat().st_size for p in fused.rglob("*") if p.is_file()) / 5
    # an export folder, its lora/ folder: adapters; a pipeline folder (even with lora/ inside): not
    assert lora_adapter_folder(str(adapter)) == adapter / "lora"
    assert lora_adapter_folder(str(adapter / "lora")) == adapter / "lora"
    assert lora_adapter_folder(str(fused)) is None and lora_adapter_folder("toyworld") is None


def test_inpaint_model_loads_the_adapter_as_it_loads_the_fused_export(exported):
    base = str(exported / "base")
    plain = Distiller(base, config=CONFIG)
    a = Distiller(base, config=CONFIG, inpaint_model=str(exported / "adapter"))
    b = Distiller(base, config=CONFIG, inpaint_model=str(exported / "fused"))
    pa, pb = dict(a.inpaint_unet.named_parameters()), dict(b.inpaint_unet.named_parameters())
    assert pa.keys() == pb.keys() and not any(".lora_" in n for n in pa)
    assert all(torch.allclose(pa[n], pb[n], atol=1e-6) for n in pa), "fused as the export fuses it"
    base_params = dict(plain.family.denoiser_module.named_parameters())
    assert any(not torch.equal(pa[n], base_params[n]) for n in pa), "the adapter changed m'"
    # the model's own denoiser (attention maps, synthesis) keeps the base weights
    assert all(torch.equal(p, base_params[n]) for n, p in a.family.denoiser_module.named_parameters())
    [ta] = a.synthesize([SampleSpec(Concept("star"), 0)])
    [tb] = b.synthesize([SampleSpec(Concept("star"), 0)])
    assert ta.meta["inpaint_model"] == "adapter" and np.array_equal(ta.image, tb.image)
    assert np.abs(ta.background.astype(int) - tb.background.astype(int)).max() <= 1


def test_an_adapter_of_another_denoiser_is_refused_before_any_weights(flux, tmp_path):
    other = BUILDERS["flux"](num_layers=2)  # one more double-stream block
    other.save_pretrained(tmp_path / "other")
    job = [
        f"model={tmp_path / 'other'}",
        f"inpaint.model={flux / 'adapter'}",
        f"output.uri={tmp_path / 'out'}",
        "concepts=[{name: star, samples: 1}]",
    ]
    with pytest.raises(ModelLoadError, match="LoRA adapter of another denoiser.*num_layers 1 against 2"):
        check_model(load_config("configs/toyworld.yaml", job))
    check_model(load_config("configs/toyworld.yaml", [f"model={flux / 'base'}", *job[1:]]))
    # without its record (lora/ copied elsewhere), loading finds tensors that name no layer of the model
    (flux / "bare").mkdir()
    (flux / "bare" / "pytorch_lora_weights.safetensors").write_bytes(
        (flux / "adapter" / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    )
    smaller = BUILDERS["flux"](num_layers=1, num_single_layers=0)
    with pytest.raises(ModelLoadError, match="tensors name no layer"):
        Distiller("smaller", pipeline=smaller, config=CONFIG, inpaint_model=str(flux / "bare"))


def test_an_unfused_export_needs_a_lora_run():
    from factory.yaml_config import ConfigError

    with pytest.raises(ConfigError, match="output.fused: false exports LoRA adapters alone"):
        load_finetune_config("configs/finetune-toyworld.yaml", ["output.fused=false"])
    cfg = load_finetune_config("configs/finetune-toyworld.yaml", ["output.fused=false", "lora={rank: 4}"])
    assert not cfg.output.fused


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """moto's S3 server on loopback; fsspec's s3 file system pointed at it (as FSSPEC_S3_ENDPOINT_URL
    would), the model cache in tmp_path."""
    import socket

    import fsspec
    from moto.server import ThreadedMotoServer

    import factory.method.loading as loading

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://127.0.0.1:{port}"})
    monkeypatch.setattr(loading, "MODEL_CACHE", tmp_path / "cache")
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("cf-models")
    yield fs
    server.stop()


def test_models_and_adapters_load_from_an_object_store(flux, s3, tmp_path):
    """model and inpaint.model as s3:// URLs: the preflight copies configs and tokenizers alone, the
    Distiller the whole folder, once per content; a new export at the same URL is copied anew."""
    s3.put(str(flux / "base"), "cf-models/flux-base", recursive=True)
    s3.put(str(flux / "adapter"), "cf-models/flux-lora", recursive=True)
    base, adapter = "s3://cf-models/flux-base", "s3://cf-models/flux-lora"
    job = [f"model={base}", f"inpaint.model={adapter}", f"output.uri={tmp_path / 'out'}"]
    check_model(load_config("configs/toyworld.yaml", [*job, "concepts=[{name: star, samples: 1}]"]))
    cache = tmp_path / "cache"
    copies = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert [c.split("-")[:2] for c in copies] == [["flux", "base"], ["flux", "lora"]]
    assert not list((cache / copies[0]).rglob("*.safetensors")), "the preflight copied no weights"
    remote = Distiller(base, config=CONFIG, inpaint_model=adapter)
    local = Distiller(str(flux / "base"), config=CONFIG, inpaint_model=str(flux / "adapter"))
    pr, pl = dict(remote.inpaint_unet.named_parameters()), dict(local.inpaint_unet.named_parameters())
    assert all(torch.equal(pr[n], pl[n]) for n in pl)
    [t] = remote.synthesize([SampleSpec(Concept("star"), 0)])
    assert t.meta["inpaint_model"] == adapter
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 3  # + the base's whole copy
    Distiller(base, config=CONFIG, inpaint_model=adapter)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 3, "copied once"
    # another export at the same URL (another step): copied anew, never the stale copy
    record = json.loads((flux / "adapter" / "finetune.json").read_text())
    with s3.open("cf-models/flux-lora/finetune.json", "w") as f:
        json.dump({**record, "step": 8}, f)
    again = Distiller(base, config=CONFIG, inpaint_model=adapter)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 4
    assert not list(cache.glob("*.partial"))
    assert all(torch.equal(p, pl[n]) for n, p in again.inpaint_unet.named_parameters())
