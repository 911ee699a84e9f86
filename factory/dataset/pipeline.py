"""The Ray pipeline: sample specs -> generation actor pool -> encode + write tasks -> shards + manifest.

    specs (driver)          one row per missing shard, derived deterministically from the config
      -> GenerateShard      Ray Data actor pool (ActorPoolStrategy): one model load per actor,
                            `num_gpus` per actor from the config; runs the Distiller on the shard's samples
      -> write_shards       CPU tasks that do not hold the GPU actors: quality filters, image encoding,
                            tar writing and atomic commit (`factory.dataset.shards`)
      -> driver             progress bar, manifest rebuilt from all shard stats, report, summary

The same plan runs on a local Ray (one CPU machine) and on a cluster of GPU nodes; `ray.init()` joins the
cluster when started by `ray job submit` (RAY_ADDRESS is set) and starts a local Ray otherwise.
Model-facing code lives in `factory.method.distiller`; nothing here touches diffusers directly.
"""

from __future__ import annotations

import json
import pickle
import time

import numpy as np

from factory.dataset.config import JobConfig
from factory.dataset.console import init_ray, verbose_from_env
from factory.dataset.faults import crash_point
from factory.dataset.filters import reject_reason
from factory.dataset.images import ImageRejected, read_image
from factory.dataset.preflight import preflight
from factory.dataset.report import print_plan, print_summary, summarize, write_report
from factory.dataset.shards import ShardStore, encode_triplet
from factory.dataset.specs import ShardTask, generation_shards, job_fingerprint, label_shards
from factory.errors import UserError, user_error_from_state, user_error_state
from factory.method.loading import quiet_model_libraries

MIN_LATENT_CELLS = 4  # label mode: an image whose shorter side spans fewer latent cells is `too_small`


class GenerateShard:
    """Ray Data actor: loads the model once, then produces the raw triplets of one shard per call."""

    def __init__(self, job: dict, mode: str, verbose: bool = False):
        import ray
        import torch

        from factory.method.distiller import Distiller

        self.cfg = JobConfig.model_validate(job)
        self.mode = mode
        quiet_model_libraries(verbose)
        torch.set_num_threads(max(1, int(self.cfg.resources.num_cpus_per_actor)))
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
            )
        except UserError as err:
            self.user_error = err
        self.node = ray.get_runtime_context().get_node_id()
        self.concepts = [c.to_concept() for c in self.cfg.concepts]
        self.min_side = MIN_LATENT_CELLS * self.distiller.vae_factor if self.user_error is None else 0

    def _run(self, samples: list[dict]) -> tuple[list, dict]:
        out, errors = [], {}
        bs = self.cfg.resources.batch_size
        for i in range(0, len(samples), bs):
            chunk = samples[i : i + bs]
            if self.mode == "generate":
                from factory.method.distiller import SampleSpec

                triplets = self.distiller.synthesize(
                    [SampleSpec(self.concepts[s["concept"]], s["seed"], s["key"]) for s in chunk]
                )
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
                triplets = self.distiller.label(
                    images,
                    [self.concepts[s["concept"]] for s in ok],
                    [s["seed"] for s in ok],
                    [s["key"] for s in ok],
                )
                for t, s in zip(triplets, ok, strict=True):
                    t.meta["source"] = s["source"]
            out.extend(triplets)
        return out, errors

    def __call__(self, batch: dict) -> dict:
        rows = {"index": [], "name": [], "payload": [], "node": [], "generate_s": []}
        for index, name, samples in zip(batch["index"], batch["name"], batch["samples"], strict=True):
            crash_point("GENERATE")
            t0 = time.perf_counter()
            try:
                if self.user_error is not None:
                    raise self.user_error
                triplets, errors = self._run(json.loads(samples))
                records = [
                    {
                        "key": t.key,
                        "image": t.image,
                        "mask": t.mask,
                        "prelim": t.prelim,
                        "attention": t.attention,
                        "foreground": t.foreground,
                        "background": t.background,
                        "meta": {**t.meta, "shard": str(name), "node": self.node},
                    }
                    for t in triplets
                ]
                payload = {"records": records, "errors": errors}
            except UserError as err:  # in-band: Ray would keep only its traceback text
                payload = {"user_error": user_error_state(err)}
            rows["index"].append(int(index))
            rows["name"].append(str(name))
            rows["payload"].append(pickle.dumps(payload))
            rows["node"].append(self.node)
            rows["generate_s"].append(time.perf_counter() - t0)
        return {
            "index": np.array(rows["index"]),
            "name": np.array(rows["name"], dtype=object),
            "payload": np.array(rows["payload"], dtype=object),
            "node": np.array(rows["node"], dtype=object),
            "generate_s": np.array(rows["generate_s"]),
        }


def write_shards(batch: dict, job: dict) -> dict:
    """Ray task: filter, encode and commit the shards in `batch`; return their stats."""
    cfg = JobConfig.model_validate(job)
    store = ShardStore(cfg.output.uri, cfg.output.storage_options)
    out = {"name": [], "stats": []}
    for name, payload, node, gen_s in zip(
        batch["name"], batch["payload"], batch["node"], batch["generate_s"], strict=True
    ):
        t0 = time.perf_counter()
        data = pickle.loads(payload)  # our own actor's payload, never a shard's or an input's bytes
        if "user_error" in data:  # nothing is written for this shard; the driver reports the error
            out["name"].append(str(name))
            out["stats"].append(json.dumps({"name": str(name), "user_error": data["user_error"]}))
            continue
        good, rejected, rejected_samples = [], {}, []
        for message in data["errors"].values():  # inputs not processed: "REASON: what was wrong"
            reason = message.split(":", 1)[0]
            rejected[reason] = rejected.get(reason, 0) + 1
        for rec in data["records"]:
            why = reject_reason(rec["meta"], cfg)
            rec["meta"]["rejected"] = why
            sample = encode_triplet(rec, cfg.output.image_format, cfg.output.jpeg_quality)
            if why is None:
                good.append(sample)
            else:
                rejected[why] = rejected.get(why, 0) + 1
                rejected_samples.append(sample)
        if cfg.filters.keep_rejected and rejected_samples:
            store.write_shard(str(name), rejected_samples, {}, subdir="rejected")
        encode_s = time.perf_counter() - t0
        stats = {
            "name": str(name),
            "written": len(good),
            "rejected": rejected,
            "node": str(node),
            "keys": [s["__key__"] for s in good],
            "errors": data["errors"],
            "timings": {
                "generate_s": float(gen_s),
                "encode_write_s": encode_s,
                "total_s": float(gen_s) + encode_s,
            },
        }
        store.write_shard(str(name), good, stats)
        out["name"].append(str(name))
        out["stats"].append(json.dumps(stats))
    return {"name": np.array(out["name"], dtype=object), "stats": np.array(out["stats"], dtype=object)}


def plan(cfg: JobConfig, mode: str, sources: list[str] | None) -> list[ShardTask]:
    if mode == "generate":
        return generation_shards(cfg)
    if mode == "label":
        return label_shards(cfg, sources or [])
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

    # 3. Run the plan on Ray: generation actors -> encode + write tasks -> stats rows to the driver.
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
        ds = ray.data.from_items([t.as_row() for t in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            GenerateShard,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(r.actors, len(todo))),
            num_gpus=r.num_gpus_per_actor or None,
            num_cpus=r.num_cpus_per_actor,
            fn_constructor_kwargs={"job": job, "mode": mode, "verbose": verbose},
        )
        ds = ds.map_batches(write_shards, batch_size=1, num_cpus=r.writer_num_cpus, fn_kwargs={"job": job})
        n_samples = sum(len(t.samples) for t in todo)
        bar = tqdm(total=n_samples, desc=f"{mode} (samples)", unit="sample", disable=not progress)
        for row in ds.iter_rows():
            st = json.loads(row["stats"])
            if "user_error" in st:
                bar.close()
                raise user_error_from_state(st["user_error"])
            stats.append(st)
            bar.update(st["written"] + sum(st["rejected"].values()))
            bar.set_postfix(shards=f"{len(stats)}/{len(todo)}", written=sum(s["written"] for s in stats))
        bar.close()
    manifest = store.write_manifest(
        [t.name for t in tasks], {"mode": mode, "fingerprint": job_fingerprint(cfg)}
    )
    wall = time.time() - t0
    summary = summarize(stats, manifest, wall, store)
    write_report(store, cfg, manifest, summary)
    print_summary(summary)
    return summary
