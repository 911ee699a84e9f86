"""The Ray pipeline: sample specs -> generation actor pool -> encode + write tasks -> shards + manifest.

    specs (driver)          one row per missing shard, derived deterministically from the config
      -> GenerateShard      Ray Data actor pool (ActorPoolStrategy): one model load per actor,
                            `num_gpus` per actor from the config; runs the Distiller on the shard's samples
      -> write_shards       CPU tasks that do not hold the GPU actors: quality filters, image encoding,
                            tar writing and atomic commit (`factory.shards`)
      -> driver             progress bar, manifest rebuilt from all shard stats, report, summary

The same plan runs on a local Ray (one CPU machine) and on a cluster of GPU nodes; `ray.init()` joins the
cluster when started by `ray job submit` (RAY_ADDRESS is set) and starts a local Ray otherwise.
Model-facing code lives in `factory.distiller`; nothing here touches diffusers directly.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from pathlib import Path

import numpy as np

from factory.config import JobConfig
from factory.shards import ShardStore, encode_triplet
from factory.specs import ShardTask, generation_shards, label_shards


def job_fingerprint(cfg: JobConfig) -> str:
    """Hash of everything that determines the shards' contents (not resources or report settings)."""
    d = cfg.model_dump()
    d.pop("resources")
    d["output"].pop("report_samples", None)
    d["output"].pop("uri", None)
    for c in d["concepts"]:
        c.pop("samples")  # more samples per concept changes which shards exist, not their contents
    if d["inpaint"]["model"] is None:
        d["inpaint"].pop("model")  # added later: outputs written before it existed keep their fingerprint
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class GenerateShard:
    """Ray Data actor: loads the model once, then produces the raw triplets of one shard per call."""

    def __init__(self, job: dict, mode: str):
        import ray
        import torch

        from factory.distiller import Distiller

        self.cfg = JobConfig.model_validate(job)
        self.mode = mode
        torch.set_num_threads(max(1, int(self.cfg.resources.num_cpus_per_actor)))
        self.distiller = Distiller(self.cfg.model, self.cfg.actor_device(), self.cfg.dtype, self.cfg.distill_config(),
                                   inpaint_model=self.cfg.inpaint.model)
        self.node = ray.get_runtime_context().get_node_id()
        self.concepts = [c.to_concept() for c in self.cfg.concepts]

    def _load(self, url: str) -> np.ndarray:
        import fsspec
        from PIL import Image

        with fsspec.open(url, "rb") as f:
            return np.asarray(Image.open(f).convert("RGB"))

    def _run(self, samples: list[dict]) -> tuple[list, dict]:
        out, errors = [], {}
        bs = self.cfg.resources.batch_size
        for i in range(0, len(samples), bs):
            chunk = samples[i : i + bs]
            if self.mode == "generate":
                from factory.distiller import SampleSpec

                triplets = self.distiller.synthesize(
                    [SampleSpec(self.concepts[s["concept"]], s["seed"], s["key"]) for s in chunk])
            else:
                images, ok = [], []
                for s in chunk:
                    try:
                        images.append(self._load(s["source"]))
                        ok.append(s)
                    except Exception as err:  # an unreadable image is a reject, not a crashed job
                        errors[s["key"]] = f"unreadable: {type(err).__name__}: {err}"
                if not ok:
                    continue
                triplets = self.distiller.label(images, [self.concepts[s["concept"]] for s in ok],
                                                [s["seed"] for s in ok], [s["key"] for s in ok])
                for t, s in zip(triplets, ok, strict=True):
                    t.meta["source"] = s["source"]
            out.extend(triplets)
        return out, errors

    def __call__(self, batch: dict) -> dict:
        rows = {"index": [], "name": [], "payload": [], "node": [], "generate_s": []}
        for index, name, samples in zip(batch["index"], batch["name"], batch["samples"], strict=True):
            t0 = time.perf_counter()
            triplets, errors = self._run(json.loads(samples))
            records = [{"key": t.key, "image": t.image, "mask": t.mask, "prelim": t.prelim,
                        "attention": t.attention, "foreground": t.foreground, "background": t.background,
                        "meta": {**t.meta, "shard": str(name), "node": self.node}} for t in triplets]
            rows["index"].append(int(index))
            rows["name"].append(str(name))
            rows["payload"].append(pickle.dumps({"records": records, "errors": errors}))
            rows["node"].append(self.node)
            rows["generate_s"].append(time.perf_counter() - t0)
        return {"index": np.array(rows["index"]), "name": np.array(rows["name"], dtype=object),
                "payload": np.array(rows["payload"], dtype=object), "node": np.array(rows["node"], dtype=object),
                "generate_s": np.array(rows["generate_s"])}


def reject_reason(meta: dict, cfg: JobConfig) -> str | None:
    """The quality filters: None if the sample is good, else the reason it is rejected."""
    f = cfg.filters
    area = meta["mask_area"]
    if area == 0.0:
        return "empty_mask"
    if area >= 0.999:
        return "full_mask"
    if area < f.min_area:
        return "area_below_min"
    if area > f.max_area:
        return "area_above_max"
    if meta["prelim_stats"]["bimodality"] < f.min_bimodality:
        return "low_bimodality"
    return None


def write_shards(batch: dict, job: dict) -> dict:
    """Ray task: filter, encode and commit the shards in `batch`; return their stats."""
    cfg = JobConfig.model_validate(job)
    store = ShardStore(cfg.output.uri)
    out = {"name": [], "stats": []}
    for name, payload, node, gen_s in zip(batch["name"], batch["payload"], batch["node"], batch["generate_s"],
                                          strict=True):
        t0 = time.perf_counter()
        data = pickle.loads(payload)
        good, rejected, rejected_samples = [], {}, []
        if data["errors"]:
            rejected["unreadable"] = len(data["errors"])
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
        stats = {"name": str(name), "written": len(good), "rejected": rejected, "node": str(node),
                 "keys": [s["__key__"] for s in good], "errors": data["errors"],
                 "timings": {"generate_s": float(gen_s), "encode_write_s": encode_s,
                             "total_s": float(gen_s) + encode_s}}
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


def check_output(store: ShardStore, cfg: JobConfig, mode: str) -> None:
    """Refuse to resume into an output folder that holds a different job."""
    fingerprint = {"fingerprint": job_fingerprint(cfg), "mode": mode}
    if store.fs.exists(store.path("job.json")):
        old = store.read_json("job.json")
        if (old.get("fingerprint"), old.get("mode")) != (fingerprint["fingerprint"], mode):
            raise RuntimeError(
                f"{store.uri} already holds shards of a different job (its job.json differs in model, prompts, "
                "sampler, masks, filters or format). Use a new output.uri, or delete the old shards to start over.")
    store.write_json("job.json", {**fingerprint, "config": cfg.model_dump()})


def run_job(cfg: JobConfig, mode: str = "generate", sources: list[str] | None = None,
            progress: bool = True) -> dict:
    """Run a generate or label job to completion (resuming whatever is already committed)."""
    import ray
    from ray.data.context import DEFAULT_WAIT_FOR_MIN_ACTORS_S
    from tqdm.auto import tqdm

    t0 = time.time()
    store = ShardStore(cfg.output.uri)
    store.ensure()
    check_output(store, cfg, mode)
    cleaned = store.clean_temporaries()
    tasks = plan(cfg, mode, sources)
    done = store.committed()
    todo = [t for t in tasks if t.name not in done]
    print(f"[factory] {mode}: {len(tasks)} shards planned, {len(tasks) - len(todo)} already committed, "
          f"{len(todo)} to produce -> {store.uri}" + (f" ({cleaned} stale temporaries removed)" if cleaned else ""))
    stats = []
    if todo:
        if not ray.is_initialized():
            ray.init(log_to_driver=True)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        job = cfg.model_dump()
        r = cfg.resources
        # the DataContext outlives this job in the process: set the wait either way, so a later job without
        # it does not inherit an earlier job's
        ctx.wait_for_min_actors_s = r.wait_for_actors_s or DEFAULT_WAIT_FOR_MIN_ACTORS_S
        ds = ray.data.from_items([t.as_row() for t in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(GenerateShard, batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=min(r.actors, len(todo))),
                            num_gpus=r.num_gpus_per_actor or None, num_cpus=r.num_cpus_per_actor,
                            fn_constructor_kwargs={"job": job, "mode": mode})
        ds = ds.map_batches(write_shards, batch_size=1, num_cpus=r.writer_num_cpus, fn_kwargs={"job": job})
        n_samples = sum(len(t.samples) for t in todo)
        bar = tqdm(total=n_samples, desc=f"{mode} (samples)", unit="sample", disable=not progress)
        for row in ds.iter_rows():
            st = json.loads(row["stats"])
            stats.append(st)
            bar.update(st["written"] + sum(st["rejected"].values()))
            bar.set_postfix(shards=f"{len(stats)}/{len(todo)}", written=sum(s["written"] for s in stats))
        bar.close()
    manifest = store.write_manifest([t.name for t in tasks], {"mode": mode, "fingerprint": job_fingerprint(cfg)})
    wall = time.time() - t0
    summary = summarize(stats, manifest, wall, store)
    write_report(store, cfg, manifest, summary)
    print_summary(summary)
    return summary


def summarize(stats: list[dict], manifest: dict, wall: float, store: ShardStore) -> dict:
    written = sum(s["written"] for s in stats)
    rejected: dict[str, int] = {}
    for s in stats:
        for k, v in s["rejected"].items():
            rejected[k] = rejected.get(k, 0) + v
    gen = sum(s["timings"]["generate_s"] for s in stats)
    enc = sum(s["timings"]["encode_write_s"] for s in stats)
    nodes = sorted({s["node"] for s in stats})
    return {"output": store.uri, "shards_this_run": len(stats), "written_this_run": written,
            "rejected_this_run": rejected, "wall_s": wall,
            "samples_per_s": (written + sum(rejected.values())) / wall if wall else 0.0,
            "generate_s": gen, "encode_write_s": enc,
            "outside_model_share": enc / (gen + enc) if gen + enc else 0.0, "nodes": nodes,
            "total_written": manifest["totals"]["written"], "complete": manifest["complete"],
            "missing_shards": manifest["missing_shards"]}


def print_summary(s: dict) -> None:
    rej = ", ".join(f"{k}: {v}" for k, v in s["rejected_this_run"].items()) or "none"
    print(f"[factory] this run: {s['written_this_run']} samples written in {s['shards_this_run']} shards, "
          f"rejected {rej}; {s['samples_per_s']:.2f} samples/s over {s['wall_s']:.0f}s on {len(s['nodes'])} node(s); "
          f"encode+write took {100 * s['outside_model_share']:.1f}% of worker time")
    state = "complete" if s["complete"] else f"INCOMPLETE, missing {s['missing_shards']}"
    print(f"[factory] output {s['output']}: {s['total_written']} samples in total, {state}; "
          f"manifest.json, report.png and report.md beside the shards")


def write_report(store: ShardStore, cfg: JobConfig, manifest: dict, summary: dict) -> None:
    """report.png (a contact sheet of committed triplets) and report.md (stats), beside the shards."""
    import io
    import tempfile

    from PIL import Image

    from factory.visualize import contact_sheet

    rows, labels = [], []
    fmt = cfg.output.image_format
    per_shard = max(1, -(-cfg.output.report_samples // max(1, len(manifest["shards"]))))
    for shard in manifest["shards"]:  # a few samples from every shard, so every concept shows
        if len(rows) >= cfg.output.report_samples:
            break
        for sample in store.read_shard(shard["name"])[:per_shard]:
            if len(rows) >= cfg.output.report_samples:
                break

            img = {k: np.asarray(Image.open(io.BytesIO(sample[k]))) for k in (fmt, "prelim.png", "mask.png", "fg.png", f"bg.{fmt}")}
            attn = np.load(io.BytesIO(sample["attn.npy"])).astype(np.float32)
            rows.append([img[fmt], attn, img["prelim.png"] > 127, img["mask.png"] > 127, img["fg.png"], img[f"bg.{fmt}"]])
            labels.append(sample["__key__"])
    if rows:
        sheet = contact_sheet(rows, ["image", "attention", "M_pre", "refined M", "foreground", "background"],
                              row_labels=labels)
        with tempfile.NamedTemporaryFile(suffix=".png", delete=False) as f:
            sheet.save(f, format="PNG")
        store._commit_bytes_file(f.name, "report.png")
        Path(f.name).unlink()
    t = manifest["totals"]
    md = [f"# Concept Factory report: {store.uri}", "",
          f"- shards: {len(manifest['shards'])} of {manifest['expected_shards']} "
          f"({'complete' if manifest['complete'] else 'incomplete'})",
          f"- samples written: {t['written']}; rejected: {json.dumps(t['rejected'])}",
          f"- this run: {summary['samples_per_s']:.2f} samples/s, encode+write share "
          f"{100 * summary['outside_model_share']:.1f}%, nodes {len(summary['nodes'])}",
          f"- model `{cfg.model}`, concepts {', '.join(c.name for c in cfg.concepts)}", "",
          "| shard | written | rejected |", "|---|---|---|"]
    md += [f"| {s['name']} | {s['written']} | {json.dumps(s['rejected'])} |" for s in manifest["shards"]]
    md += ["", "![triplets](report.png)", ""]
    with tempfile.NamedTemporaryFile("w", suffix=".md", delete=False) as f:
        f.write("\n".join(md))
    store._commit_bytes_file(f.name, "report.md")
    Path(f.name).unlink()
