"""Shard writing and reading back with the three readers users use."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from factory.dataset.shards import ShardStore, encode_triplet


def _triplet(key, rng):
    mask = np.zeros((16, 16), bool)
    mask[4:10, 5:12] = True
    img = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    return {
        "key": key,
        "image": img,
        "mask": mask,
        "prelim": mask[::4, ::4],
        "attention": rng.random((4, 4)),
        "foreground": np.concatenate([img, mask[..., None].astype(np.uint8) * 255], -1),
        "background": img[::-1].copy(),
        "meta": {"key": key, "mask_area": float(mask.mean())},
    }


@pytest.fixture()
def written(tmp_path):
    rng = np.random.default_rng(0)
    store = ShardStore(str(tmp_path / "out"))
    store.ensure()
    for s in range(2):
        samples = [encode_triplet(_triplet(f"k-{s}-{i}", rng), "png") for i in range(3)]
        store.write_shard(f"shard-{s:06d}", samples, {"written": 3, "rejected": {}})
    return store


def test_commit_is_atomic_and_listed(written, tmp_path):
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == [
        "shard-000000.stats.json",
        "shard-000000.tar",
        "shard-000001.stats.json",
        "shard-000001.tar",
    ]
    assert written.committed() == {"shard-000000", "shard-000001"}
    # a tar without its stats (a crash between the two commits) does not count as committed
    (tmp_path / "out" / "shard-000001.stats.json").unlink()
    assert written.committed() == {"shard-000000"}
    (tmp_path / "out" / "shard-000002.tar.tmp-1-2").write_bytes(b"partial")
    assert written.clean_temporaries() == 1


def test_round_trip_with_webdataset(written):
    import webdataset as wds

    urls = [written.path(f"shard-{s:06d}.tar") for s in range(2)]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert len(samples) == 6
    s = samples[0]
    assert set(s) >= {"__key__", "png", "mask.png", "prelim.png", "attn.npy", "fg.png", "bg.png", "json"}
    raw = next(iter(wds.WebDataset(urls, shardshuffle=False)))
    assert (
        Image.open(io.BytesIO(raw["fg.png"])).mode == "RGBA"
        and Image.open(io.BytesIO(raw["mask.png"])).mode == "L"
    )
    assert s["png"].shape == (16, 16, 3)
    assert s["attn.npy"].dtype == np.float16 and s["json"]["key"] == s["__key__"]


def test_round_trip_with_ray_data(written, local_ray):
    import ray

    ds = ray.data.read_webdataset([written.path(f"shard-{s:06d}.tar") for s in range(2)])
    rows = ds.take_all()
    assert len(rows) == 6
    row = rows[0]
    mask = np.asarray(row["mask.png"])
    assert mask.shape == (16, 16) and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(row["fg.png"]).shape == (16, 16, 4) and np.asarray(row["attn.npy"]).dtype == np.float16
    assert row["json"]["key"] == row["__key__"]


def test_round_trip_with_hf_datasets(written):
    from datasets import load_dataset

    ds = load_dataset(
        "webdataset",
        data_files={"train": [written.path(f"shard-{s:06d}.tar") for s in range(2)]},
        split="train",
    )
    assert len(ds) == 6
    ex = ds[0]
    assert ex["png"].size == (16, 16) and ex["json"]["key"] == ex["__key__"]


def test_read_shard_and_manifest(written):
    samples = written.read_shard("shard-000001.tar")
    assert [s["__key__"] for s in samples] == ["k-1-0", "k-1-1", "k-1-2"]
    m = written.write_manifest(["shard-000000", "shard-000001", "shard-000002"], {"mode": "test"})
    assert m["totals"]["written"] == 6 and m["missing_shards"] == ["shard-000002"] and not m["complete"]
    assert json.loads(written.fs.cat_file(written.path("manifest.json")))["expected_shards"] == 3


def test_object_store_path_uses_a_single_put(tmp_path):
    """fsspec's in-memory filesystem stands in for an object store (no s3/gs server is reachable here)."""
    store = ShardStore("memory://bucket/job")
    store.ensure()
    store.write_shard(
        "shard-000000",
        [encode_triplet(_triplet("m-0", np.random.default_rng(1)), "jpg")],
        {"written": 1, "rejected": {}},
    )
    assert store.committed() == {"shard-000000"}
    assert [s["__key__"] for s in store.read_shard("shard-000000.tar")] == ["m-0"]


def test_an_assembly_that_ray_runs_again_after_its_commit_returns_the_committed_stats(tmp_path):
    """Ray re-runs a finished assembly task whose output was lost with its node; the parts are gone by
    then (the commit removed them), so the task returns the committed stats instead of failing the job."""
    import json as _json

    from factory.dataset.config import load_config
    from factory.dataset.shards import ShardStore
    from factory.dataset.writers import assemble_shards

    cfg = load_config("configs/toyworld.yaml", [f"output.uri={tmp_path / 'out'}"])
    (tmp_path / "out").mkdir()
    store = ShardStore(str(tmp_path / "out"))
    stats = {"name": "shard-000001", "written": 3, "rejected": {}, "timings": {"encode_write_s": 0.1}}
    store.write_json("shard-000001.stats.json", stats)
    batch = {
        "name": ["shard-000001"],
        "result": [_json.dumps({"parts": ["part-000000-000001"], "memory": {}})],
    }
    out = assemble_shards(batch, cfg.model_dump())
    assert [_json.loads(s) for s in out["stats"]] == [stats]
