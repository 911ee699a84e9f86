"""Deterministic sample specs and their shard assignment, derived from the job config alone.

Sample i of concept c gets seed = hash(job seed, c, i) and key "{c}-{i:08d}". Samples are laid out
concept-major and cut into shards of `samples_per_shard`, named "{prefix}-{index:06d}". The same config
therefore always yields the same shards with the same contents, which is what makes resume possible.
A shard is a range of that order, not a list: the plan of a 10M-sample job is its ~10k shard ranges.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

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
    if d["vae"] is None:
        d.pop("vae")  # added later, like inpaint.model
    d["output"].pop("storage_options", None)  # how to reach the store, not what is in it
    for section in ("sampler", "inpaint"):  # added later; the paper's DDIM keeps older outputs' fingerprint
        if d[section]["scheduler"] == "ddim":
            d[section].pop("scheduler")
    if d["input"] == InputConfig().model_dump():
        d.pop("input")  # added later, like inpaint.model; it only matters for label mode's large images
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def derive_seed(*parts) -> int:
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class ShardTask:
    """One shard to produce: its name and which samples it holds, without listing them.

    A generation shard is the range [start, stop) of the job's concept-major sample order, so a plan is
    O(shards) in the driver whatever the sample count (`samples(cfg)` derives the specs on demand). A label
    shard lists its samples (`listed`): they name the user's files, which the driver has listed anyway.
    """

    index: int
    name: str
    start: int
    stop: int
    listed: tuple[dict, ...] = ()  # label mode: {"key", "seed", "concept", "source"}

    def __len__(self) -> int:
        return self.stop - self.start

    def samples(self, cfg: JobConfig, start: int = 0, stop: int | None = None) -> list[dict]:
        """The specs of samples [start, stop) of this shard (default: all): {"key", "seed", "concept": index
        into cfg.concepts, "source": path or None}."""
        stop = len(self) if stop is None else min(stop, len(self))
        if self.listed:
            return [dict(s) for s in self.listed[start:stop]]
        return generation_samples(cfg, self.start + start, self.start + stop)

    def concept_counts(self, cfg: JobConfig) -> list[int]:
        """How many samples of each concept the shard holds (arithmetic, nothing listed)."""
        if self.listed:
            return [sum(1 for s in self.listed if s["concept"] == i) for i in range(len(cfg.concepts))]
        counts, offset = [], 0
        for c in cfg.concepts:
            counts.append(max(0, min(self.stop, offset + c.samples) - max(self.start, offset)))
            offset += c.samples
        return counts

    def as_row(self) -> dict:
        return {
            "index": self.index,
            "name": self.name,
            "start": self.start,
            "stop": self.stop,
            "listed": json.dumps([dict(s) for s in self.listed]),
        }

    @classmethod
    def from_row(cls, row: dict) -> ShardTask:
        listed = tuple(json.loads(row["listed"])) if row["listed"] else ()
        return cls(int(row["index"]), str(row["name"]), int(row["start"]), int(row["stop"]), listed)


def shard_name(cfg: JobConfig, index: int) -> str:
    return f"{cfg.output.prefix}-{index:06d}"


def generation_samples(cfg: JobConfig, start: int, stop: int) -> list[dict]:
    """Samples [start, stop) of the job's concept-major order: sample i of concept c has the key
    "{c}-{i:08d}" and the seed hash(job seed, c, i)."""
    out, offset = [], 0
    for ci, c in enumerate(cfg.concepts):
        for i in range(max(start, offset) - offset, min(stop, offset + c.samples) - offset):
            out.append(
                {
                    "key": f"{safe_key(c.name)}-{i:08d}",
                    "seed": derive_seed(cfg.seed, c.name, i),
                    "concept": ci,
                    "source": None,
                }
            )
        offset += c.samples
    return out


def generation_shards(cfg: JobConfig) -> list[ShardTask]:
    """The shards of a generate job: O(shards) time and memory (10M samples plan in well under a second)."""
    n, total = cfg.output.samples_per_shard, sum(c.samples for c in cfg.concepts)
    return [ShardTask(i // n, shard_name(cfg, i // n), i, min(i + n, total)) for i in range(0, total, n)]


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
    n = cfg.output.samples_per_shard
    return [
        ShardTask(i // n, shard_name(cfg, i // n), i, min(i + n, len(samples)), tuple(samples[i : i + n]))
        for i in range(0, len(samples), n)
    ]


def refine_shards(cfg: JobConfig) -> list[ShardTask]:
    """Refine mode: one shard per committed shard of the source output (`input.refine_from`), of the same
    name and keys; each sample's concept is the job's concept its key starts with (as both modes name
    keys: "{concept}-..."). Reads the source's manifest and stats files, not its samples."""
    from factory.dataset.shards import ShardStore

    source = ShardStore(cfg.input.refine_from, cfg.output.storage_options)
    prefixes = sorted(
        ((f"{safe_key(c.name)}-", i) for i, c in enumerate(cfg.concepts)), key=lambda p: -len(p[0])
    )
    tasks = []
    for index, shard in enumerate(source.read_json("manifest.json")["shards"]):
        name = shard["name"].removesuffix(".tar")
        listed = []
        for key in source.read_json(f"{name}.stats.json")["keys"]:
            ci = next((i for p, i in prefixes if key.startswith(p)), None)
            if ci is None:
                raise ValueError(
                    f"sample {key!r} of {cfg.input.refine_from} is of none of the job's concepts"
                )
            listed.append({"key": key, "seed": None, "concept": ci, "source": name})
        tasks.append(ShardTask(index, name, 0, len(listed), tuple(listed)))
    return tasks
