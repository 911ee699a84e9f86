"""Every student of a job, or of several: the rows each trains on (Ray Data), one Ray Train run per student,
and one Ray Tune run over all of them (each job's concepts and seeds, or its multi-class students)."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np

from factory.dataset.ray_start import init_ray
from factory.dataset.shards import decode_sample
from factory.dataset.sources import storage_path
from trainers.students.config import StudentsConfig
from trainers.students.export import export_student
from trainers.students.loop import is_validation_row, student_train_loop


def _prepare_and_split(batch: dict, every: int, **kw) -> dict:
    """prepare_rows plus each row's key and validation flag (1 in `every` by key hash)."""
    from trainers.students.data import prepare_rows

    out = prepare_rows(batch, **kw)
    out["key"] = np.asarray(batch["__key__"], dtype=object)
    out["val"] = np.array([is_validation_row(k, every) for k in batch["__key__"]], bool)
    return out


def _dataset(cfg: StudentsConfig, urls: list[str], concepts: list[str] | None, classes: list[str] | None):
    """(the training rows or dataset, the validation arrays (centre crops)).

    Shard rows are decoded and resized in Ray Data (`prepare_rows`). With `data.cache` (the default) that is
    one execution here, whose prepared rows (4 * S^2 bytes a row) go to the workers as one object in Ray's
    object store, each worker drawing every epoch's crops of its share itself (`cached_batches`): an epoch
    of a small set is a few steps, and every Ray Data execution costs seconds of start-up (measured: the
    worker's own execution of a 140-row set made its first 250 steps take ~40 s longer). Returns
    ({"stack", "label"}, val). Without the cache every epoch streams the shards through Ray Data again (sets
    larger than memory), the crops drawn there: returns (the Ray Dataset, val)."""
    import ray

    from factory.dataset.shards import sample_meta
    from trainers.students.data import prepare_rows, to_student_examples

    size, cpus, every = cfg.model.resolution, cfg.data.map_num_cpus, cfg.data.val_every
    ds = ray.data.read_webdataset(urls, shuffle="files", decoder=decode_sample, num_cpus=cpus)
    if concepts:  # rows of other concepts go before any decoding (and no batch comes out empty)
        keep = set(concepts)
        ds = ds.filter(lambda r: sample_meta(r).get("concept") in keep, num_cpus=cpus)
    kw = {"size": size, "target": cfg.data.target, "classes": classes}
    multiclass = classes is not None
    if cfg.data.cache:
        rows = ds.map_batches(
            _prepare_and_split, batch_size=32, num_cpus=cpus, fn_kwargs={**kw, "every": every}
        ).take_all()
        # in key order: the reader shuffles the shard files (shuffle="files") and Ray Data need not keep
        # the blocks' order, so without it each run's students saw the rows in another order and the same
        # seed trained another student (the tables' seed 0 star student: val IoU 0.69 in one run, 0.63
        # in the next, on the same shards)
        rows.sort(key=lambda r: r["key"])
        train_rows = [r for r in rows if not r["val"]]
        val_rows = [r for r in rows if r["val"]]
        train = {
            "stack": [r["stack"] for r in train_rows],
            "label": np.array([r["label"] for r in train_rows], np.int64),
        }
    else:
        train = ds.filter(lambda r: not is_validation_row(r["__key__"], every), num_cpus=cpus)
        train = train.map_batches(prepare_rows, batch_size=32, num_cpus=cpus, fn_kwargs=kw)
        train = train.map_batches(
            to_student_examples,
            batch_size=32,
            num_cpus=cpus,
            fn_kwargs={"size": size, "multiclass": multiclass, "augment": cfg.data.augment},
        )
        val_rows = (
            ds.filter(lambda r: is_validation_row(r["__key__"], every), num_cpus=cpus)
            .map_batches(prepare_rows, batch_size=32, num_cpus=cpus, fn_kwargs=kw)
            .take_all()
        )
    # validation: centre crops, fixed once (a small set)
    val = to_student_examples(
        {"stack": [r["stack"] for r in val_rows], "label": np.array([r["label"] for r in val_rows])},
        size,
        augment=None,
        multiclass=multiclass,
    )
    return train, val


def train_one(job: dict, concept: str | None, classes: list[str] | None, urls: list[str]) -> dict:
    """One student's Ray Train run (a Ray Tune trial, or called directly). Returns its summary."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = StudentsConfig.model_validate(job)
    name = concept or "multiclass"
    ray.data.DataContext.get_current().enable_progress_bars = False
    train, val = _dataset(cfg, urls, [concept] if concept else None, classes)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    started = time.time()
    trainer = TorchTrainer(
        student_train_loop,
        train_loop_config={
            "job": job,
            "concept": concept,
            "classes": classes,
            "val": val,
            # one copy in the object store, whatever the number of workers; each reads its share zero-copy
            "rows": ray.put(train) if cfg.data.cache else None,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=f"{cfg.output.name}-{name}",
            storage_path=storage_path(cfg.output.storage),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
        ),
        datasets=None if cfg.data.cache else {"train": train},
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    out = Path(cfg.output.export) / name
    export_student(cfg, result, out, concept, classes)
    return {
        "student": name,
        "seed": cfg.train.seed,
        "export": str(out),
        "started": started,
        "finished": time.time(),
        "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))},
        "val_images": int(len(val["image"])),
    }


def discover_concepts(urls_by_source: dict[str, list[str]]) -> list[str]:
    """The concepts named in the job.json beside each source's shards (the jobs that wrote them)."""
    import fsspec

    found: list[str] = []
    for source in urls_by_source:
        job = source.rstrip("/") + "/job.json"
        try:
            with fsspec.open(job, "r") as f:
                names = [c["name"] for c in json.load(f)["config"]["concepts"]]
        except (FileNotFoundError, KeyError, json.JSONDecodeError):
            continue
        found += [n for n in names if n not in found]
    return found


def _trials(cfg: StudentsConfig, job_index: int) -> tuple[list[dict], str]:
    """One students job's trials (one per concept and seed, or one multi-class student per seed) and its line
    for the log. Paths are made absolute here, in the driver: Ray Tune runs each trial in a working directory
    of its own, so relative local paths would land there (fsspec URLs stay as they are)."""
    from factory.dataset.sources import list_shards

    urls_by_source = {s: list_shards(s) for s in cfg.data.shards}
    urls = [u for us in urls_by_source.values() for u in us]
    concepts = cfg.data.concepts or discover_concepts(urls_by_source)
    if not concepts:
        raise ValueError("no concepts: list them in data.concepts (the shard folders carry no job.json)")
    cfg = cfg.model_copy(deep=True)
    cfg.output.storage = storage_path(cfg.output.storage)
    cfg.output.export = storage_path(cfg.output.export)
    if cfg.model.pretrained:
        cfg.model.pretrained = storage_path(cfg.model.pretrained)
    job = cfg.model_dump()
    seeds = cfg.train.seeds or [cfg.train.seed]

    def seed_job(seed: int) -> dict:
        """The job of one seed's students: with train.seeds, their own seed, run name and export folder."""
        if not cfg.train.seeds:
            return job
        j = copy.deepcopy(job)
        j["train"]["seed"] = seed
        j["output"]["name"] = f"{cfg.output.name}-seed{seed}"
        j["output"]["export"] = f"{cfg.output.export.rstrip('/')}/seed{seed}"
        return j

    also = f", seeds {', '.join(map(str, seeds))}" if cfg.train.seeds else ""
    if cfg.multiclass:  # one student (background + every concept) per seed
        students = [(None, concepts, s) for s in seeds]
        what = f"{len(students)} multi-class student(s) (background + {', '.join(concepts)}{also})"
    else:  # one student per concept and seed
        students = [(c, None, s) for c in concepts for s in seeds]
        what = f"{len(students)} students ({', '.join(concepts)}{also})"
    trials = [
        {"job_index": job_index, "job": seed_job(s), "concept": c, "classes": classes, "urls": urls}
        for c, classes, s in students
    ]
    line = (
        f"[students] {cfg.output.name}: {what}, backbone {cfg.model.backbone}, {cfg.train.steps} steps each, "
        f"on {len(urls)} shards"
    )
    return trials, line


def run_students(cfg: StudentsConfig, verbose: bool | None = None) -> dict:
    """Every student of one job (`trainers students`) in one Ray Tune run; returns its summary (also written
    to `{export}/students.json`)."""
    [summary] = run_student_jobs([cfg], verbose)
    return summary


def run_student_jobs(cfgs: list[StudentsConfig], verbose: bool | None = None) -> list[dict]:
    """The students of several jobs (other shards, targets, multi-class or not, step counts) in one Ray Tune
    run: one start-up of Tune for all of them, and the longest students start first, so that at most
    `scaling.max_concurrent` at once (the smallest of the jobs') keep every slot busy to the end (the tables'
    four training sets: issue 33). Returns each job's summary, in order; each is also written to its
    `{export}/students.json`."""
    import ray
    from ray import tune

    if not cfgs:
        raise ValueError("no students jobs")
    init_ray(verbose)
    ray.data.DataContext.get_current().enable_progress_bars = False
    trials: list[dict] = []
    for i, cfg in enumerate(cfgs):
        more, line = _trials(cfg, i)
        trials += more
        print(line, flush=True)
    # longest first (a stable sort: each job's own order stays): the step counts differ between jobs
    trials.sort(key=lambda t: -t["job"]["train"]["steps"])
    limits = [c.scaling.max_concurrent for c in cfgs if c.scaling.max_concurrent]
    at_once = min([len(trials), *limits])
    print(f"[students] {len(trials)} students in one Tune run, {at_once} at once", flush=True)
    t0 = time.time()

    def trial(config: dict) -> None:
        t = trials[config["trial"]]
        summary = train_one(t["job"], t["concept"], t["classes"], t["urls"])
        tune.report({"summary": json.dumps({**summary, "job_index": t["job_index"]})})

    first = cfgs[0]
    tuner = tune.Tuner(
        tune.with_resources(trial, {"CPU": 0.01}),  # the trial only drives its Ray Train run
        param_space={"trial": tune.grid_search(list(range(len(trials))))},
        tune_config=tune.TuneConfig(max_concurrent_trials=at_once),
        run_config=tune.RunConfig(
            name=f"{first.output.name}-tune", storage_path=storage_path(first.output.storage), verbose=0
        ),
    )
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} student run(s) failed; the first: {errors[0]}")
    results = [json.loads(r.metrics["summary"]) for r in grid]
    wall = time.time() - t0
    summaries = []
    for i, cfg in enumerate(cfgs):
        own = [{k: v for k, v in r.items() if k != "job_index"} for r in results if r["job_index"] == i]
        export = storage_path(cfg.output.export)
        summary = {"students": own, "wall_s": wall, "export": export}
        Path(export).mkdir(parents=True, exist_ok=True)
        (Path(export) / "students.json").write_text(json.dumps(summary, indent=1))
        summaries.append(summary)
    for r in sorted(results, key=lambda r: r["started"]):
        m, cfg = r["metrics"], cfgs[r["job_index"]]
        print(
            f"[students] {r['student']}"
            + (f" seed {r['seed']}" if cfg.train.seeds else "")
            + f": {r['started'] - t0:6.1f}s -> {r['finished'] - t0:6.1f}s, step "
            f"{m.get('step')}, loss {m.get('loss', float('nan')):.4f}, "
            f"val IoU {m.get('val_iou', float('nan')):.3f}"
            f" -> {r['export']}",
            flush=True,
        )
    return summaries
