"""The Ray pipeline: shard plan -> generation actor pool -> part writers -> shard assembly -> manifest.

    plan (driver)           one row per missing shard: a range of the job's samples, O(shards)
      -> GenerateShard      Ray Data actor pool (ActorPoolStrategy): one model load per actor, `num_gpus`
                            per actor from the config; runs the Distiller on `samples_per_call` samples at
                            a time and hands each call's drafts (a GPU actor) or triplets (a CPU actor,
                            which refines them itself) to a `write_part` task at once
      -> write_part         CPU tasks beside the actors (at most WRITES_IN_FLIGHT per actor; the refined
                            mask of a GPU actor's drafts, quality filters, image encoding, one committed
                            part of the shard: factory.dataset.writers, factory.dataset.shards)
      -> assemble_shards    CPU tasks: the parts streamed into the shard's tar, its stats, atomic commit
      -> driver             progress bar, manifest rebuilt from all shard stats, report, summary

Memory and loss are bounded by `resources.samples_per_call`, not by `output.samples_per_shard`: an actor
holds one call's arrays (plus the writes in flight), a Ray object holds one call's, and a crash loses the
call in progress; committed parts are kept and the retry (or the next run) skips them.

The same plan runs on a local Ray (one CPU machine) and on a cluster of GPU nodes; `ray.init()` joins the
cluster when started by `ray job submit` (RAY_ADDRESS is set) and starts a local Ray otherwise.
Model-facing code lives in `factory.method.distiller`; nothing here touches diffusers directly.
"""

from __future__ import annotations

import json
import os
import resource
import threading
import time

import numpy as np

from factory.dataset.config import JobConfig
from factory.dataset.console import verbose_from_env
from factory.dataset.faults import armed, crash_point, hold_point
from factory.dataset.images import ImageRejected, read_image
from factory.dataset.preflight import preflight
from factory.dataset.ray_start import init_ray
from factory.dataset.report import print_plan, print_summary, summarize, write_report
from factory.dataset.shards import ShardStore
from factory.dataset.specs import (
    ShardTask,
    generation_shards,
    job_fingerprint,
    label_shards,
    refine_shards,
)
from factory.dataset.writers import assemble_shards, write_part
from factory.errors import UserError, user_error_from_state, user_error_state
from factory.method.loading import quiet_model_libraries

MIN_LATENT_CELLS = 4  # label mode: an image whose shorter side spans fewer latent cells is `too_small`
WRITES_IN_FLIGHT = 2  # part writes an actor lets run behind it before it waits for the oldest


def part_ranges(n_samples: int, per_call: int) -> list[tuple[str, int, int]]:
    """The parts of a shard of `n_samples`: (name, start, stop) in the shard's own sample offsets."""
    return [
        (f"part-{a:06d}-{min(a + per_call, n_samples):06d}", a, min(a + per_call, n_samples))
        for a in range(0, n_samples, per_call)
    ]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class GenerateShard:
    """Ray Data actor: loads the model once, then produces one shard per call, part by part."""

    def __init__(self, job: dict, mode: str, verbose: bool = False, progress=None):
        import ray
        import torch

        from factory.method.distiller import Distiller

        self.cfg = JobConfig.model_validate(job)
        self.job = job
        self.mode = mode
        quiet_model_libraries(verbose)
        torch.set_num_threads(self.cfg.resources.actor_threads)
        # A user error here (weights that do not load, say) is handed back with the first shard, as the
        # user's error, instead of failing the constructor: Ray would restart the actor forever, and hand
        # the driver a traceback in a string.
        self.user_error = None
        try:
            self.distiller = Distiller(
                self.cfg.model,
                self.cfg.actor_device(),
                self.cfg.dtype,
                self.cfg.distill_config(),
                inpaint_model=self.cfg.inpaint.model,
                vae=self.cfg.vae,
            )
        except UserError as err:
            self.user_error = err
        self.node = ray.get_runtime_context().get_node_id()
        self.concepts = [c.to_concept() for c in self.cfg.concepts]
        self.min_side = MIN_LATENT_CELLS * self.distiller.vae_factor if self.user_error is None else 0
        self.store = ShardStore(self.cfg.output.uri, self.cfg.output.storage_options)
        self.write_part = ray.remote(num_cpus=self.cfg.resources.writer_num_cpus)(write_part)
        self.commit_part = write_part  # the same function, in this process (a CPU actor's parts)
        self.progress = progress  # the driver's PartProgress, or None
        self._source_shard = None  # refine mode: (name, its samples by key), the shard being refined
        # Who runs Steps 5-6 (the refined mask: CPU work) and writes the parts. A GPU actor hands its drafts
        # to writer tasks, so that the GPU waits for no refined mask and no encoding. A CPU actor finishes
        # and commits its parts itself: writer tasks would run on its own cores, and cost more there than
        # the work (issue 31, the demo, 2 actors on 2 cores): finishing in each writer process paid the
        # imports of scikit-learn and OpenCV (refine 0.17-0.40 s a sample against 0.015 in the actor), and
        # Ray started a fresh worker process for most part writes (10 of the 12 that ran the demo's 21
        # writes ran one each: idle workers beyond the CPU count are stopped after a second), which slowed
        # the actors' own stages by ~15% (generate 0.85 s a sample against 0.72 with the writes at the end).
        self.finish_in_actor = self.user_error is None and self.distiller.device.type == "cpu"

    def _run(self, samples: list[dict]) -> tuple[list, dict]:
        out, errors = [], {}
        bs = self.cfg.resources.batch_size
        for i in range(0, len(samples), bs):
            chunk = samples[i : i + bs]
            if self.mode == "generate":
                from factory.dataset.prompt_variety import concept_for_sample
                from factory.method.settings import SampleSpec

                drawn = [concept_for_sample(self.cfg.concepts[s["concept"]], s["seed"]) for s in chunk]
                drafts = self.distiller.synthesize(
                    [SampleSpec(c, s["seed"], s["key"]) for (c, _), s in zip(drawn, chunk, strict=True)],
                    finish=False,
                )
                for t, (_, values) in zip(drafts, drawn, strict=True):
                    if values:  # the prompt itself is in every sample's metadata already
                        t.meta["prompt_attributes"] = values
            elif self.mode == "refine":
                drafts = self._refine(chunk)
            else:
                images, ok = [], []
                for s in chunk:
                    try:
                        images.append(read_image(s["source"], self.cfg.input.max_pixels, self.min_side))
                        ok.append(s)
                    except ImageRejected as err:  # a bad image is a reject, not a crashed job
                        errors[s["key"]] = str(err)
                if not ok:
                    continue
                drafts = self.distiller.label(
                    images,
                    [self.concepts[s["concept"]] for s in ok],
                    [s["seed"] for s in ok],
                    [s["key"] for s in ok],
                    finish=False,
                )
                for t, s in zip(drafts, ok, strict=True):
                    t.meta["source"] = s["source"]
            out.extend(drafts)
        return out, errors

    def _refine(self, chunk: list[dict]) -> list:
        """Refine mode: the chunk's samples as the source output holds them (image, concept map, seed,
        prompt), drafted by this job's distiller without a probe (`Distiller.with_maps`)."""
        from factory.dataset.shards import ShardStore, decode_member, sample_image
        from factory.method.settings import Concept, SampleSpec

        shard = chunk[0]["source"]
        if self._source_shard is None or self._source_shard[0] != shard:  # one read per source shard
            src = ShardStore(self.cfg.input.refine_from, self.cfg.output.storage_options)
            self._source_shard = (shard, {r["__key__"]: r for r in src.read_shard(f"{shard}.tar")})
        records = [self._source_shard[1][s["key"]] for s in chunk]
        metas = [decode_member("json", r["json"]) for r in records]
        specs = []
        for s, meta in zip(chunk, metas, strict=True):
            c = self.concepts[s["concept"]]  # the source's own prompt (it may have been drawn per sample)
            prompt = meta["prompt"].replace("{", "{{").replace("}", "}}")
            specs.append(SampleSpec(Concept(c.name, prompt, c.words), int(meta["seed"]), s["key"]))
        images = [sample_image(r) for r in records]
        attention = [decode_member("attn.npy", r["attn.npy"]) for r in records]
        mb, drafts = self.distiller.batch_size(len(specs)), []
        for i in range(0, len(specs), mb):  # micro-batches, as `Distiller.label` calls the model
            maps = self.distiller.with_maps(images[i : i + mb], attention[i : i + mb], specs[i : i + mb])
            drafts += self.distiller.draft(maps)
        for d, meta in zip(drafts, metas, strict=True):
            d.meta["refined_from"] = {"output": self.cfg.input.refine_from, "mode": meta.get("mode")}
            if meta.get("source"):
                d.meta["source"] = meta["source"]
        return drafts

    def _shard(self, task: ShardTask) -> dict:
        """Produce the parts of one shard that are not committed yet; return what the assembly needs."""
        import ray

        done = self.store.parts_done(task.name)  # a retry, or the next run, skips what is committed
        parts = part_ranges(len(task), self.cfg.samples_per_call())
        pending, max_bytes, generated = [], 0, 0
        for name, a, b in parts:
            if name in done:
                continue
            if generated and armed("MID_SHARD"):  # tests only: die with this call's earlier parts committed
                ray.get(pending)
                crash_point("MID_SHARD")
            t0 = time.perf_counter()
            # the samples' drafts (Steps 1-4, the model calls), finished (Steps 5-6) and written by whoever
            # has the CPU to spare (`finish_in_actor`)
            drafts, errors = self._run(task.samples(self.cfg, a, b))
            items = [d.finish() for d in drafts] if self.finish_in_actor else drafts
            records = [  # a Draft's or a Triplet's fields; the meta gains where it was made
                {**vars(t), "meta": {**t.meta, "shard": task.name, "node": self.node}} for t in items
            ]
            max_bytes = max(max_bytes, sum(t.nbytes for t in items))  # what Ray stores for the write
            generate_s = time.perf_counter() - t0
            origin = {"node": self.node, "pid": os.getpid()}
            args = (self.job, task.name, name, records, errors, origin, generate_s, self.progress)
            if self.finish_in_actor:  # a CPU actor: committed here, before the next call
                self.commit_part(*args)
            else:
                pending.append(self.write_part.remote(*args))
            del records, drafts, items  # the object store holds them now
            generated += 1
            if len(pending) > WRITES_IN_FLIGHT:  # bounded: never more than this many calls in memory
                ready, pending = ray.wait(pending, num_returns=len(pending) - WRITES_IN_FLIGHT)
                ray.get(ready)
        ray.get(pending)  # every part committed before the shard goes on to its assembly
        return {
            "parts": [name for name, _, _ in parts],
            "memory": {"call_bytes_max": max_bytes, "actor_peak_rss_bytes": peak_rss_bytes()},
        }

    def __call__(self, batch: dict) -> dict:
        rows = {"name": [], "result": []}
        for i in range(len(batch["name"])):
            crash_point("GENERATE")
            hold_point("GENERATE")
            task = ShardTask.from_row({k: batch[k][i] for k in batch})
            try:
                if self.user_error is not None:
                    raise self.user_error
                result = self._shard(task)
            except UserError as err:  # in-band: Ray would keep only its traceback text
                result = {"user_error": user_error_state(err)}
            rows["name"].append(task.name)
            rows["result"].append(json.dumps(result))
        return {k: np.array(v, dtype=object) for k, v in rows.items()}


class PartProgress:
    """A Ray actor on the driver's node: the samples of the parts committed so far, so that the progress bar
    moves per committed part (a call of `samples_per_call` samples), not per shard. Advisory: a part that a
    retry commits again counts twice here, so the bar takes the larger of this count and the committed
    shards' exact one, and ends on the exact one."""

    def __init__(self):
        self.samples = 0

    def add(self, n: int) -> None:
        self.samples += n

    def total(self) -> int:
        return self.samples


def follow_parts(bar, counter, done, lock, interval_s: float = 1.0) -> None:
    """Driver thread: move `bar` to the samples of the committed parts, every `interval_s`, until `done`."""
    import ray

    while not done.wait(interval_s):
        try:
            n = ray.get(counter.total.remote(), timeout=10)
        except Exception:  # noqa: BLE001  (the counter is advisory: a lost actor leaves the bar per shard)
            continue
        with lock:
            if min(n, bar.total) > bar.n:
                bar.update(min(n, bar.total) - bar.n)


def plan(cfg: JobConfig, mode: str, sources: list[str] | None) -> list[ShardTask]:
    if mode == "generate":
        return generation_shards(cfg)
    if mode == "label":
        return label_shards(cfg, sources or [])
    if mode == "refine":
        return refine_shards(cfg)
    raise ValueError(f"unknown mode {mode!r}")


def claim_output(store: ShardStore, cfg: JobConfig, mode: str) -> None:
    """Record the job in the output folder's job.json (what the preflight checks a later job against)."""
    store.write_json(
        "job.json", {"fingerprint": job_fingerprint(cfg), "mode": mode, "config": cfg.public_dump()}
    )


def run_job(
    cfg: JobConfig,
    mode: str = "generate",
    sources: list[str] | None = None,
    progress: bool = True,
    verbose: bool | None = None,
    dry_run: bool = False,
) -> dict:
    """Run a generate or label job on Ray to completion, resuming whatever is already committed.

    Joins the Ray cluster when one is set (`ray job submit`, RAY_ADDRESS) and starts a local Ray otherwise.

    Args:
        cfg: the validated job (`load_config`).
        mode: `"generate"` (synthesize and label, paper Step 5) or `"label"` (the user's images).
        sources: label mode's image URLs (`factory.dataset.sources.list_images`).
        progress: show the job's progress bar.
        verbose: let Ray's and diffusers' per-actor log lines and loading bars through (default: quiet).
        dry_run: run the read-only preflight checks, print the plan and return it; start nothing, write
            nothing.

    Returns:
        The summary: samples written and rejected this run, samples/s, nodes, the output's totals, and
        `complete` (every planned shard committed). With `dry_run`, the plan (`print_plan`).

    Raises:
        UserError: a preflight check failed (the output, the model, a prompt), or a user error came back
            from an actor; the message says what to fix.

    Example:
        >>> summary = run_job(load_config("configs/toyworld.yaml", ["output.uri=out/x"]), "generate")
        >>> summary["complete"]
        True
    """
    import ray
    from ray.data.context import DEFAULT_WAIT_FOR_MIN_ACTORS_S
    from tqdm.auto import tqdm

    t0 = time.time()
    # 1. Preflight on the driver, before Ray starts: output, model, prompts (factory/dataset/preflight.py).
    preflight(cfg, mode, write_probe=not dry_run)
    store = ShardStore(cfg.output.uri, cfg.output.storage_options)

    # 2. Plan: one task per shard, minus the shards already committed.
    tasks = plan(cfg, mode, sources)
    done = store.committed()
    todo = [t for t in tasks if t.name not in done]
    if dry_run:
        return print_plan(cfg, mode, tasks, todo, store)
    store.ensure()
    claim_output(store, cfg, mode)
    cleaned = store.clean_temporaries()
    print(
        f"[factory] {mode}: {len(tasks)} shards planned, {len(tasks) - len(todo)} already committed, "
        f"{len(todo)} to produce -> {store.public_uri}"
        + (f" ({cleaned} stale temporaries removed)" if cleaned else "")
    )

    # 3. Run the plan on Ray: generation actors (-> part writers) -> shard assembly -> stats to the driver.
    stats = []
    if todo:
        verbose = verbose_from_env() if verbose is None else verbose
        init_ray(verbose)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        job = cfg.model_dump()
        r = cfg.resources
        # the DataContext outlives this job in the process: set the wait either way, so a later job without
        # it does not inherit an earlier job's
        ctx.wait_for_min_actors_s = r.wait_for_actors_s or DEFAULT_WAIT_FOR_MIN_ACTORS_S
        counter = None
        if progress:  # on the driver's node, which outlives the job's workers
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            counter = ray.remote(num_cpus=0)(PartProgress).options(scheduling_strategy=here).remote()
        if not verbose:
            print(
                "[factory] (Ray Data logs one error line per actor pool as it starts, 'has constructor "
                "arguments in the object store': a known notice, ray-project/ray#57733, not a failure)"
            )
        ds = ray.data.from_items([t.as_row() for t in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            GenerateShard,
            batch_size=1,
            # One shard at a time per actor: the next goes to whichever actor frees first. Ray Data's default
            # queues two per actor, so the first actor up could hold two shards while another idled: in the
            # demo's 3 shards (50, 50, 20 samples) on 2 actors one actor made 100 samples and the other 20,
            # and the job took ~35% longer than with one each (issue 31).
            compute=ray.data.ActorPoolStrategy(
                size=min(r.actors, len(todo)), max_tasks_in_flight_per_actor=1
            ),
            num_gpus=r.num_gpus_per_actor or None,
            num_cpus=r.num_cpus_per_actor,
            fn_constructor_kwargs={"job": job, "mode": mode, "verbose": verbose, "progress": counter},
        )
        ds = ds.map_batches(assemble_shards, batch_size=1, num_cpus=r.writer_num_cpus, fn_kwargs={"job": job})
        n_samples = sum(len(t) for t in todo)
        bar = tqdm(total=n_samples, desc=f"{mode} (samples)", unit="sample", disable=not progress)
        lock, done = threading.Lock(), threading.Event()
        follower = threading.Thread(target=follow_parts, args=(bar, counter, done, lock), daemon=True)
        if counter is not None:
            follower.start()
        exact = 0  # the samples of the committed shards
        try:
            for row in ds.iter_rows():
                st = json.loads(row["stats"])
                if "user_error" in st:
                    raise user_error_from_state(st["user_error"])
                stats.append(st)
                exact += st["written"] + sum(st["rejected"].values())
                with lock:
                    bar.update(max(0, exact - bar.n))
                    bar.set_postfix(
                        shards=f"{len(stats)}/{len(todo)}", written=sum(s["written"] for s in stats)
                    )
            done.set()
            with lock:  # the exact count, should a retried part have been counted twice
                bar.n = exact
                bar.refresh()
        finally:
            done.set()
            if counter is not None:
                follower.join()
                ray.kill(counter)
            bar.close()
    manifest = store.write_manifest(
        [t.name for t in tasks], {"mode": mode, "fingerprint": job_fingerprint(cfg)}
    )
    wall = time.time() - t0
    if manifest["complete"]:
        store.remove_parts_folder_if_empty()
    summary = summarize(stats, manifest, wall, store)
    write_report(store, cfg, manifest, summary)
    print_summary(summary)
    return summary
