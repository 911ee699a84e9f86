"""Deterministic sample specs and their shard assignment, derived from the job config alone.

Sample i of concept c gets seed = hash(job seed, c, i) and key "{c}-{i:08d}". Samples are laid out
concept-major and cut into shards of `samples_per_shard`, named "{prefix}-{index:06d}". The same config
therefore always yields the same shards with the same contents, which is what makes resume possible.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass

from factory.dataset.config import InputConfig, JobConfig


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
    d["output"].pop("storage_options", None)  # how to reach the store, not what is in it
    if d["input"] == InputConfig().model_dump():
        d.pop("input")  # added later, like inpaint.model; it only matters for label mode's large images
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def derive_seed(*parts) -> int:
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class ShardTask:
    """One shard to produce: its name and the samples it holds."""

    index: int
    name: str
    samples: tuple[dict, ...]  # {"key", "seed", "concept": index into cfg.concepts, "source": path or None}

    def as_row(self) -> dict:
        import json

        return {
            "index": self.index,
            "name": self.name,
            "samples": json.dumps([dict(s) for s in self.samples]),
        }


def shard_name(cfg: JobConfig, index: int) -> str:
    return f"{cfg.output.prefix}-{index:06d}"


def _cut(cfg: JobConfig, samples: list[dict]) -> list[ShardTask]:
    n = cfg.output.samples_per_shard
    return [
        ShardTask(i // n, shard_name(cfg, i // n), tuple(samples[i : i + n]))
        for i in range(0, len(samples), n)
    ]


def generation_shards(cfg: JobConfig) -> list[ShardTask]:
    samples = [
        {
            "key": f"{safe_key(c.name)}-{i:08d}",
            "seed": derive_seed(cfg.seed, c.name, i),
            "concept": ci,
            "source": None,
        }
        for ci, c in enumerate(cfg.concepts)
        for i in range(c.samples)
    ]
    return _cut(cfg, samples)


def safe_key(text: str) -> str:
    """A sample key part that is a plain file-name stem: letters, digits, '_' and '-' only. WebDataset
    splits a member name at its first '.', and a '/' or '..' in a tar member would point outside it."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text) or "_"


def _key_from_path(path: str) -> str:
    return safe_key(path.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0])


def label_shards(cfg: JobConfig, sources: list[str]) -> list[ShardTask]:
    """One sample per (image, concept); the concept list is usually a single concept in label mode."""
    samples, seen = [], set()
    for ci, c in enumerate(cfg.concepts):
        for path in sorted(sources):
            key = f"{safe_key(c.name)}-{_key_from_path(path)}"
            if key in seen:
                key = f"{key}-{derive_seed(path) % 10**6:06d}"
            seen.add(key)
            samples.append(
                {"key": key, "seed": derive_seed(cfg.seed, c.name, path), "concept": ci, "source": path}
            )
    return _cut(cfg, samples)


def describe(task: ShardTask) -> dict:
    return asdict(task)
