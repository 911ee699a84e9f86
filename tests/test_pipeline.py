"""The Ray pipeline on a real local Ray: shards, manifest, report, resume, filters, label mode, readers."""

import json
import os

import pytest
import ray

from factory.dataset.config import load_config
from factory.dataset.pipeline import run_job
from factory.dataset.preflight import OutputError
from factory.dataset.shards import ShardStore
from factory.dataset.sources import list_images

FAST = [
    "sampler.steps=6",
    "sampler.probe_t0=4",
    "inpaint.steps=6",
    "output.samples_per_shard=2",
    "resources.actors=2",
    "resources.num_cpus_per_actor=0.75",
    "output.report_samples=4",
]


def job(tmp_path, *extra, name="out"):
    return load_config(
        "configs/toyworld.yaml",
        [
            f"output.uri={tmp_path / name}",
            "concepts=[{name: star, samples: 3}, {name: ring, samples: 2}]",
            *FAST,
            *extra,
        ],
    )


@pytest.fixture(scope="module", autouse=True)
def _ray(local_ray):
    """Every test here runs on the shared local Ray (conftest.py)."""


@pytest.mark.integration
def test_generate_writes_shards_manifest_report_and_resumes(tmp_path):
    cfg = job(tmp_path, "filters.min_area=0.0", "filters.max_area=1.0")
    summary = run_job(cfg, "generate", progress=False)
    out = tmp_path / "out"
    assert summary["complete"] and summary["shards_this_run"] == 3
    names = sorted(p.name for p in out.glob("*.tar"))
    assert names == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    manifest = json.loads((out / "manifest.json").read_text())
    t = manifest["totals"]
    assert t["written"] + sum(t["rejected"].values()) == 5 and manifest["complete"]
    assert (out / "report.png").stat().st_size > 1000 and "shard-000000.tar" in (
        out / "report.md"
    ).read_text()
    samples = ShardStore(str(out)).read_shard("shard-000000.tar")
    assert {"png", "mask.png", "prelim.png", "attn.npy", "fg.png", "bg.png", "json"} <= set(samples[0])
    meta = json.loads(samples[0]["json"])
    assert meta["concept"] == "star" and meta["model"] == "toyworld" and "node" in meta

    # resume: remove one committed shard; only it is produced again, the others are untouched
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "shard-000001.tar").unlink()
    (out / "shard-000001.stats.json").unlink()
    again = run_job(cfg, "generate", progress=False)
    assert again["shards_this_run"] == 1 and again["complete"]
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert after["shard-000000.tar"] == before["shard-000000.tar"]
    assert after["shard-000002.tar"] == before["shard-000002.tar"]
    totals = json.loads((out / "manifest.json").read_text())["totals"]
    assert (totals["written"], totals["rejected"]) == (t["written"], t["rejected"])
    # nothing left to do: a third run produces nothing
    assert run_job(cfg, "generate", progress=False)["shards_this_run"] == 0


@pytest.mark.integration
def test_wait_for_actors_fails_clearly_when_the_pool_cannot_start_and_does_not_leak(tmp_path):
    """resources.wait_for_actors_s: a pool the cluster cannot place (3 CPUs per actor on 2) fails with Ray
    Data's timeout instead of waiting forever, and the next job in the process does not inherit the wait."""
    from ray.data.context import DEFAULT_WAIT_FOR_MIN_ACTORS_S

    cfg = job(tmp_path, "resources.num_cpus_per_actor=3", "resources.wait_for_actors_s=2")
    with pytest.raises(Exception, match="Timed out while starting actors"):
        run_job(cfg, "generate", progress=False)
    assert not list((tmp_path / "out").glob("*.tar"))
    fine = job(tmp_path, "filters.min_area=0.0", "concepts=[{name: star, samples: 2}]", name="out2")
    assert run_job(fine, "generate", progress=False)["complete"]
    assert ray.data.DataContext.get_current().wait_for_min_actors_s == DEFAULT_WAIT_FOR_MIN_ACTORS_S


@pytest.mark.integration
def test_a_different_job_cannot_resume_into_the_same_output(tmp_path):
    run_job(job(tmp_path, "concepts=[{name: star, samples: 1}]"), "generate", progress=False)
    with pytest.raises(OutputError, match="different job"):  # in the preflight, before Ray does any work
        run_job(
            job(tmp_path, "concepts=[{name: star, samples: 1}]", "masks.rule=otsu"),
            "generate",
            progress=False,
        )


@pytest.mark.integration
def test_quality_filters_reject_by_reason_and_keep_rejects_aside(tmp_path):
    cfg = job(
        tmp_path,
        "concepts=[{name: heart, samples: 2}]",
        "filters.min_area=0.95",
        "filters.max_area=1.0",
        "filters.keep_rejected=true",
    )
    summary = run_job(cfg, "generate", progress=False)
    assert summary["written_this_run"] == 0 and sum(summary["rejected_this_run"].values()) == 2
    assert set(summary["rejected_this_run"]) <= {"area_below_min", "empty_mask"}
    assert (tmp_path / "out" / "rejected" / "shard-000000.tar").exists()
    assert ShardStore(str(tmp_path / "out")).read_shard("shard-000000.tar") == []


@pytest.mark.integration
def test_label_mode_on_a_folder_of_images(tmp_path):
    from PIL import Image

    from factory.toyworld.world import render

    src = tmp_path / "images"
    src.mkdir()
    for i in range(3):
        Image.fromarray(render(100 + i, concept="circle", background_only=False).image).save(
            src / f"img{i}.png"
        )
    (src / "broken.png").write_bytes(b"not an image")
    (src / "notes.txt").write_text("ignored")
    sources = list_images(str(src))
    assert len(sources) == 4 and all(s.endswith(".png") for s in sources)
    cfg = job(tmp_path, "concepts=[{name: circle}]", "filters.min_area=0.0", "output.samples_per_shard=10")
    summary = run_job(cfg, "label", sources, progress=False)
    assert summary["complete"]
    stats = json.loads((tmp_path / "out" / "shard-000000.stats.json").read_text())
    assert stats["rejected"].get("unreadable") == 1 and "circle-broken" in stats["errors"]
    samples = ShardStore(str(tmp_path / "out")).read_shard("shard-000000.tar")
    assert sorted(s["__key__"] for s in samples) == [
        f"circle-img{i}" for i in range(3) if f"circle-img{i}" in stats["keys"]
    ]
    meta = json.loads(samples[0]["json"])
    assert meta["mode"] == "label" and meta["source"].endswith(".png")
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(str(tmp_path / "missing"))


def test_list_images_from_glob_and_list_file(tmp_path):
    for n in ("a.jpg", "b.png", "c.txt"):
        (tmp_path / n).write_bytes(b"x")
    assert [os.path.basename(p) for p in list_images(str(tmp_path / "*.png"))] == ["b.png"]
    lst = tmp_path / "list.txt"
    lst.write_text(f"{tmp_path / 'a.jpg'}\n# comment\n\ns3://bucket/x.png\n")
    assert list_images(str(lst)) == [str(tmp_path / "a.jpg"), "s3://bucket/x.png"]


@pytest.mark.integration
def test_a_user_error_inside_an_actor_comes_back_as_itself(tmp_path, capsys):
    """A model whose configs read (so the preflight passes) but whose UNet weights are missing: the actors
    fail to load it, and the driver raises that ModelLoadError itself, which the CLI prints as one line."""
    from factory.errors import run_command
    from factory.method.loading import MODELS_DIR, ModelLoadError

    broken = tmp_path / "broken-model"
    for src in (MODELS_DIR / "toyworld").rglob("*"):
        dst = broken / src.relative_to(MODELS_DIR / "toyworld")
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        elif not (src.parent.name == "unet" and src.suffix == ".safetensors"):
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)
    cfg = job(tmp_path, f"model={broken}", "concepts=[{name: star, samples: 2}]")
    with pytest.raises(ModelLoadError, match="could not load the pipeline in"):
        run_job(cfg, "generate", progress=False)
    assert run_command("factory", lambda: run_job(cfg, "generate", progress=False)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        "factory: error: could not load the pipeline in"
    ) and "Traceback" not in "".join(err)
    assert not list((tmp_path / "out").glob("*.tar"))


@pytest.mark.integration
def test_a_non_finite_attention_map_is_a_counted_reject_not_a_failed_job(tmp_path, toyworld_pipe):
    """A model whose concept map overflows (an fp16 NaN or inf, made here with an inf in one cross-attention
    key projection) rejects its samples as `nonfinite_attention`; the job completes (issue 30: a plain
    ValueError in the GMM failed the actor call, and Ray retried it until the job failed)."""
    import copy

    import torch

    pipe = copy.deepcopy(toyworld_pipe)
    name = next(n for n, _ in pipe.unet.named_modules() if n.endswith("attn2.to_k"))
    with torch.no_grad():
        pipe.unet.get_submodule(name).weight[0, 0] = float("inf")
    pipe.save_pretrained(tmp_path / "overflowing")
    cfg = job(tmp_path, f"model={tmp_path / 'overflowing'}", "filters.keep_rejected=true")
    summary = run_job(cfg, "generate", progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert summary["complete"] and manifest["totals"]["written"] == 0
    assert manifest["totals"]["rejected"] == {"nonfinite_attention": 5}


@pytest.mark.integration
def test_the_progress_bar_moves_per_committed_part(tmp_path, monkeypatch):
    """A shard of 4 samples, one sample per call: the bar moves as each part commits, before the shard's
    assembly (it used to move per shard: a 1000-sample shard showed nothing for minutes), and ends exact."""
    from factory.dataset import pipeline

    seen = []

    class Recording:  # the job's bar, with every move the part follower makes recorded
        def __init__(self, bar):
            self.bar = bar

        def __getattr__(self, name):
            return getattr(self.bar, name)

        def update(self, k):
            self.bar.update(k)
            seen.append(self.bar.n)

    follow = pipeline.follow_parts
    monkeypatch.setattr(pipeline, "follow_parts", lambda bar, *a: follow(Recording(bar), *a, interval_s=0.05))
    cfg = load_config(
        "configs/toyworld.yaml",
        [
            f"output.uri={tmp_path / 'out'}",
            "concepts=[{name: star, samples: 4}]",
            *FAST,
            "output.samples_per_shard=4",
            "resources.actors=1",
            "resources.batch_size=1",
            "resources.samples_per_call=1",
        ],
    )
    summary = run_job(cfg, "generate", progress=True)
    assert summary["complete"] and summary["shards_this_run"] == 1
    assert any(0 < n < 4 for n in seen), seen  # parts counted while the shard was still being made
    assert seen == sorted(seen) and max(seen) <= 4


@pytest.mark.integration
def test_a_cpu_actor_refines_and_writes_its_own_samples_and_a_gpu_actor_hands_on_drafts(tmp_path):
    """Who runs Steps 5-6 and the write (`GenerateShard.finish_in_actor`): a CPU actor finishes its triplets
    and commits its parts itself (writer processes would share its cores: the demo ran ~15-20% longer); a
    GPU actor hands drafts to writer tasks (its GPU waits for no refined mask). The writer takes either, and
    both give the same encoded samples."""
    from factory.dataset.pipeline import GenerateShard
    from factory.dataset.specs import generation_shards
    from factory.dataset.writers import as_triplet

    cfg = job(tmp_path, "concepts=[{name: star, samples: 2}]", "output.samples_per_shard=2")
    actor = GenerateShard(cfg.model_dump(), "generate")
    assert actor.distiller.device.type == "cpu" and actor.finish_in_actor

    handed = []

    class Writer:  # stands in for the Ray task: keeps what the actor hands on
        @staticmethod
        def remote(job, shard, part, records, *rest):
            handed.append(("task", records))
            return ray.put({})

    actor.write_part = Writer
    actor.commit_part = lambda job, shard, part, records, *rest: handed.append(("actor", records))
    task = generation_shards(cfg)[0]
    actor._shard(task)
    actor.finish_in_actor = False  # what a GPU actor does
    actor._shard(task)
    assert [where for where, _ in handed] == ["actor", "task"]  # committed in the CPU actor; a GPU's task
    triplets, drafts = (records for _, records in handed)
    assert all("mask" in r and "settings" not in r for r in triplets)  # finished in the actor
    assert all("settings" in r and "mask" not in r for r in drafts)  # handed on unfinished
    for t, d in zip(triplets, drafts, strict=True):
        a, b = as_triplet(t), as_triplet(d)
        for field in ("image", "mask", "prelim", "attention", "foreground", "background"):
            assert (a[field] == b[field]).all(), field
