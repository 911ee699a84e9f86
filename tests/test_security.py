"""Safe inputs: nothing from a shard is ever unpickled, weights load without pickle, sample keys stay plain
names whatever the user's file names, and credentials are never written (docs/reliability.md)."""

import ast
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from factory.dataset.config import load_config, redact_uri
from factory.dataset.shards import decode_sample, read_tar
from factory.dataset.specs import generation_shards, label_shards

REPO = Path(__file__).resolve().parents[1]


class _Trap:
    """Unpickling this creates a file: the proof that something was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _hostile_shard(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Trap(marker))
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, format="PNG")
    members = {
        "png": png.getvalue(),
        "json": b'{"concept": "star"}',
        "pyd": payload,
        "pth": payload,
        "pickle": payload,
    }
    tar_path = tmp_path / "hostile.tar"
    with tarfile.open(tar_path, "w") as tar:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"star-0001.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return tar_path, marker


def test_nothing_from_a_shard_is_unpickled(tmp_path):
    tar_path, marker = _hostile_shard(tmp_path)
    [sample] = read_tar(str(tar_path))
    decoded = decode_sample(sample)
    assert decoded["json"] == {"concept": "star"} and decoded["png"].shape == (8, 8, 3)
    assert all(isinstance(decoded[k], bytes) for k in ("pyd", "pth", "pickle"))
    assert not marker.exists(), "a shard member was unpickled"


@pytest.mark.integration
def test_the_trainers_ray_reader_does_not_unpickle_either(tmp_path, local_ray):
    tar_path, marker = _hostile_shard(tmp_path)
    # the reader the trainers use, with the decoder they give it
    [row] = local_ray.data.read_webdataset([str(tar_path)], decoder=decode_sample).take_all()
    assert row["json"] == {"concept": "star"} and isinstance(row["pyd"], bytes)
    assert not marker.exists(), "a shard member was unpickled"


def test_every_torch_load_refuses_pickled_code():
    """Checked in the source: every torch.load passes weights_only=True (shipped weights are safetensors)."""
    calls = []
    for path in [*(REPO / "factory").rglob("*.py"), *(REPO / "trainers").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load":
                if getattr(node.func.value, "id", None) == "torch":
                    kw = {k.arg: k.value for k in node.keywords}
                    ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                    calls.append((f"{path.relative_to(REPO)}:{node.lineno}", ok))
    assert calls and all(ok for _, ok in calls), [c for c, ok in calls if not ok]
    shipped = [
        p.suffix
        for p in (REPO / "factory" / "models").rglob("*")
        if p.suffix in (".bin", ".pt", ".pth", ".ckpt")
    ]
    assert not shipped


def test_sample_keys_stay_plain_names_whatever_the_file_names(tmp_path):
    cfg = load_config("configs/toyworld-label.yaml", [f"output.uri={tmp_path}"])
    sources = [
        "/data/../../etc/passwd.png",
        "s3://b/a/../x y é.jpg",
        "C:\\photos\\IMG 1.2.jpg",
        "/abs/path/ünïcödé.png",
        "./rel/with space.png",
        "http://host/q?a=1&b=../2.png",
    ]
    keys = [s["key"] for t in label_shards(cfg, sources) for s in t.samples(cfg)]
    assert len(keys) == len(set(keys)) == len(sources)
    for k in keys:
        assert (
            k.replace("-", "").replace("_", "").isascii() and k.replace("-", "").replace("_", "").isalnum()
        ), k
        assert "/" not in k and ".." not in k and "." not in k
    gen = load_config(
        "configs/toyworld.yaml", [f"output.uri={tmp_path}", "concepts=[{name: '../../x y', samples: 2}]"]
    )
    assert [s["key"] for t in generation_shards(gen) for s in t.samples(gen)] == [
        "______x_y-00000000",
        "______x_y-00000001",
    ]


def test_credentials_are_redacted_from_what_is_written(tmp_path):
    assert redact_uri("s3://AKIA:SECRETSENTINEL@bucket/prefix") == "s3://<redacted>@bucket/prefix"
    cfg = load_config(
        "configs/toyworld.yaml",
        [
            "output.uri=s3://AKIA:SECRETSENTINEL@bucket/x",
            "output.storage_options={key: a, secret: SECRETSENTINEL}",
        ],
    )
    assert "SECRETSENTINEL" not in repr(cfg.public_dump())
