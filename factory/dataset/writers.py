"""The CPU side of a job: a part writer per generation call, and the shard assembly.

    write_part       Ray task beside the generation actors: finish one call's drafts (the refined mask),
                     filter and encode them, commit them as one part of their shard
    assemble_shards  Ray Data task: the shard's committed parts streamed into its tar, its stats, commit

No torch here, nor in what this module imports: every writer and assembly worker process imports it, and on
a CPU machine that import competes with the generation actors for the cores (importing torch took 1.4 s of
the 1.8 s that `factory.dataset.pipeline` took; issue 31's demo measurement).
"""

from __future__ import annotations

import json
import time

import numpy as np

from factory.dataset.config import JobConfig
from factory.dataset.filters import reject_reason
from factory.dataset.shards import ShardStore, encode_triplet
from factory.method.triplet import Draft


def write_part(
    job: dict,
    shard: str,
    part: str,
    records: list,
    errors: dict,
    origin: dict,
    gen_s: float,
    progress=None,
):
    """One call's records, filtered and encoded, committed as one part of `shard`: a Ray task beside a GPU
    actor, whose records are drafts, finished here (the refined mask: CPU work, here rather than in the GPU
    actor); called in the actor by a CPU actor, whose records are triplets already
    (`GenerateShard.finish_in_actor`).

    `origin` names the actor that generated them ({"node", "pid"}); the shard's stats keep it per part.
    `progress`: the driver's `PartProgress`, told the part's samples once it is committed."""
    cfg = JobConfig.model_validate(job)
    store = ShardStore(cfg.output.uri, cfg.output.storage_options)
    t0 = time.perf_counter()
    good, rejected, rejected_samples = [], {}, []
    for message in errors.values():  # inputs not processed: "REASON: what was wrong"
        reason = message.split(":", 1)[0]
        rejected[reason] = rejected.get(reason, 0) + 1
    for record in records:
        rec = as_triplet(record)
        why = reject_reason(rec["meta"], cfg)
        rec["meta"]["rejected"] = why
        sample = encode_triplet(rec, cfg.output.image_format, cfg.output.jpeg_quality)
        if why is None:
            good.append(sample)
        else:
            rejected[why] = rejected.get(why, 0) + 1
            rejected_samples.append(sample)
    kept = rejected_samples if cfg.filters.keep_rejected else []
    store.write_part_samples(shard, part, good, kept)
    stats = {
        "written": len(good),
        "rejected": rejected,
        "rejects_kept": len(kept),  # samples in the part's rejects' tar (written only when there are any)
        "keys": [s["__key__"] for s in good],
        "errors": errors,
        **origin,
        "timings": {"generate_s": gen_s, "encode_write_s": time.perf_counter() - t0},
    }
    store.commit_part(shard, part, stats)
    if progress is not None:  # fire and forget: the bar is advisory, the shard stats are the record
        progress.add.remote(len(good) + sum(rejected.values()))
    return stats


def as_triplet(record: dict) -> dict:
    """A record's triplet fields: a Draft's finished here (Steps 5-6), a Triplet's as they are."""
    return vars(Draft(**record).finish()) if "settings" in record else record


def assemble_shards(batch: dict, job: dict) -> dict:
    """Ray task: stream each shard's committed parts into its tar, commit it with its stats; return them."""
    cfg = JobConfig.model_validate(job)
    store = ShardStore(cfg.output.uri, cfg.output.storage_options)
    out = {"name": [], "stats": []}
    for name, result in zip(batch["name"], batch["result"], strict=True):
        name, result = str(name), json.loads(result)
        if "user_error" in result:  # nothing is written for this shard; the driver reports the error
            out["name"].append(name)
            out["stats"].append(json.dumps({"name": name, "user_error": result["user_error"]}))
            continue
        if store.fs.exists(store.path(f"{name}.stats.json")):
            # committed already: Ray re-ran this task (its output was lost with a node) after the commit
            # removed the parts; the committed stats are the shard's
            out["name"].append(name)
            out["stats"].append(json.dumps(store.read_json(f"{name}.stats.json")))
            continue
        t0 = time.perf_counter()
        parts = [store.read_part_stats(name, p) for p in result["parts"]]
        rejected: dict[str, int] = {}
        for p in parts:
            for reason, n in p["rejected"].items():
                rejected[reason] = rejected.get(reason, 0) + n
        gen_s = sum(p["timings"]["generate_s"] for p in parts)
        enc_s = sum(p["timings"]["encode_write_s"] for p in parts)
        stats = {
            "name": name,
            "written": sum(p["written"] for p in parts),
            "rejected": rejected,
            "node": parts[-1]["node"],
            "keys": [k for p in parts for k in p["keys"]],
            "errors": {k: v for p in parts for k, v in p["errors"].items()},
            "parts": [
                {"name": n, "written": p["written"], "node": p["node"], "pid": p["pid"]}
                for n, p in zip(result["parts"], parts, strict=True)
            ],
            "memory": result["memory"],
            "timings": {"generate_s": gen_s, "encode_write_s": enc_s, "total_s": gen_s + enc_s},
        }
        with_rejects = [n for n, p in zip(result["parts"], parts, strict=True) if p["rejects_kept"]]
        store.assemble(name, result["parts"], stats, with_rejects)
        stats["timings"]["assemble_s"] = time.perf_counter() - t0  # this run's figure, not in the file
        out["name"].append(name)
        out["stats"].append(json.dumps(stats))
    return {"name": np.array(out["name"], dtype=object), "stats": np.array(out["stats"], dtype=object)}
