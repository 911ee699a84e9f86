"""Shard writing: triplets -> WebDataset tar shards on any fsspec filesystem, committed atomically.

Each sample of a shard holds
    {key}.jpg (or .png)   image            {key}.mask.png    refined mask, 0/255
    {key}.prelim.png      preliminary mask {key}.attn.npy    float16 mean attention map
    {key}.fg.png          RGBA cut-out     {key}.bg.jpg      inpainted background
    {key}.json            metadata
A shard is built from parts: each generation-actor call (`resources.samples_per_call` samples) is
committed as `_parts/{name}/{part}.tar` + `{part}.json`, so a crash loses at most the call in progress,
and no process ever holds a whole shard. When every part is there, the parts are streamed member by
member into one local temporary file, the shard. On a local filesystem it is moved into place with an
atomic rename in the destination folder; on an object store it is uploaded in one put, which makes the
object visible only once complete. Its stats file ({name}.stats.json) is committed after the tar: a shard
counts as done only when both exist, so a crash never leaves a shard that resume skips but readers cannot
read. Then its parts are removed (or, after a crash, by the next run). The manifest is rebuilt from all
stats files at the end of every run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from collections.abc import Iterator
from typing import IO

import fsspec
import numpy as np
from PIL import Image

from factory.dataset.faults import crash_point

MANIFEST = "manifest.json"
PARTS = "_parts"  # uncommitted shards' committed parts: _parts/{shard}/{part}.tar|.rejected.tar|.json


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _image(array: np.ndarray, fmt: str, quality: int) -> bytes:
    if fmt == "png":
        return _png(array)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_triplet(t: dict, image_format: str = "jpg", jpeg_quality: int = 95) -> dict:
    """A triplet (dict of arrays + meta) -> a WebDataset sample of encoded bytes."""
    attn = io.BytesIO()
    np.save(attn, np.asarray(t["attention"], np.float16))
    return {
        "__key__": t["key"],
        image_format: _image(t["image"], image_format, jpeg_quality),
        "mask.png": _png(np.asarray(t["mask"], np.uint8) * 255),
        "prelim.png": _png(np.asarray(t["prelim"], np.uint8) * 255),
        "attn.npy": attn.getvalue(),
        "fg.png": _png(t["foreground"]),
        f"bg.{image_format}": _image(t["background"], image_format, jpeg_quality),
        "json": json.dumps(t["meta"], sort_keys=True).encode(),
    }


SAFE_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")


def decode_member(key: str, value):
    """One member of a shard sample, decoded by its extension: images to arrays, `.json` to objects, `.npy` to
    arrays (`allow_pickle=False`); every other member stays bytes, and a decoded value passes through.
    Nothing from a shard is ever unpickled: webdataset's default decoders would unpickle `.pyd` and
    `torch.load` `.pth` members."""
    if key.startswith("__") or not isinstance(value, (bytes, bytearray)):
        return value
    ext = key.rsplit(".", 1)[-1].lower()
    if ext in SAFE_IMAGE_EXTENSIONS:
        return np.asarray(Image.open(io.BytesIO(value)))
    if ext == "json":
        return json.loads(value)
    if ext == "npy":
        return np.load(io.BytesIO(value), allow_pickle=False)
    return bytes(value)


def decode_sample(sample: dict) -> dict:
    """Every member of a shard sample decoded (`decode_member`): the decoder our readers give
    `ray.data.read_webdataset(decoder=...)`, and what the report and the trainers read samples with."""
    return {key: decode_member(key, value) for key, value in sample.items()}


def sample_meta(sample: dict) -> dict:
    """A shard sample's metadata (its `.json`), raw or decoded."""
    return decode_member("json", sample["json"])


def sample_image(sample: dict) -> np.ndarray:
    """A shard sample's image as (H, W, 3) uint8, raw or decoded (jpg, png or jpeg; grey becomes RGB)."""
    for ext in SAFE_IMAGE_EXTENSIONS:
        if sample.get(ext) is not None:
            img = np.asarray(decode_member(ext, sample[ext]))
            return np.repeat(img[..., None], 3, 2) if img.ndim == 2 else img[..., :3]
    raise KeyError(
        f"shard sample {sample.get('__key__')!r} has no image ({', '.join(SAFE_IMAGE_EXTENSIONS)})"
    )


def read_tar(url: str, limit: int | None = None, fs=None) -> list[dict]:
    """The samples of a WebDataset tar at any fsspec URL (or a path on the filesystem `fs`) as
    {"__key__": ..., ext: bytes} dicts, in order; at most `limit` samples. Members are bytes: nothing is
    decoded, so nothing is unpickled, and no member is extracted to disk."""
    import tarfile

    samples: dict[str, dict] = {}
    opened = fs.open(url, "rb") if fs is not None else fsspec.open(url, "rb")
    with opened as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = member.name.split(".", 1)
            if key not in samples and limit is not None and len(samples) >= limit:
                break
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())


class ShardStore:
    """The output folder of a job: shards, their stats, the manifest. `uri` is any fsspec URL."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        self.local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )

    @property
    def public_uri(self) -> str:
        """The URI as it may be printed or written: credentials in it redacted."""
        from factory.dataset.config import redact_uri

        return redact_uri(self.uri)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def url(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def ensure(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)

    def committed(self) -> set[str]:
        """Names of shards whose tar and stats both exist."""
        self.fs.invalidate_cache(self.root)  # object stores cache listings (s3fs): list what is there now
        if not self.fs.exists(self.root):
            return set()
        files = {p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)}
        return {
            f[: -len(".stats.json")]
            for f in files
            if f.endswith(".stats.json") and f[: -len(".stats.json")] + ".tar" in files
        }

    def _commit_bytes_file(self, local_tmp: str, name: str) -> None:
        if self.local:
            final = self.path(name)
            tmp = f"{final}.tmp-{os.getpid()}-{time.monotonic_ns()}"
            self.fs.put_file(local_tmp, tmp)  # copy into the destination folder, then rename atomically
            os.replace(tmp, final)
        else:
            self.fs.put_file(local_tmp, self.path(name))

    @contextlib.contextmanager
    def committing(self, name: str, mode: str = "wb") -> Iterator[IO]:
        """A local temporary file to write `name` into: when the block ends it is committed
        (`_commit_bytes_file`), and the temporary file is removed either way."""
        f = tempfile.NamedTemporaryFile(mode, suffix=os.path.splitext(name)[1], delete=False)
        try:
            with f:
                yield f
            self._commit_bytes_file(f.name, name)
        finally:
            os.unlink(f.name)

    def write_json(self, name: str, obj) -> None:
        with self.committing(name, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)

    def read_json(self, name: str):
        with self.fs.open(self.path(name), "r") as f:
            return json.load(f)

    def write_shard(self, name: str, samples: list[dict], stats: dict, subdir: str = "") -> str:
        """Write `samples` as {name}.tar in one piece, then {name}.stats.json. Returns the tar's URL."""
        prefix = f"{subdir}/" if subdir else ""
        if subdir:
            self.fs.makedirs(self.path(subdir), exist_ok=True)
        self._commit_samples(samples, f"{prefix}{name}.tar")
        if not subdir:
            self.write_json(f"{name}.stats.json", stats)
        return self.url(f"{prefix}{name}.tar")

    def read_shard(self, name: str) -> list[dict]:
        """All samples of a committed shard as {"__key__": ..., ext: bytes} dicts (WebDataset grouping)."""
        return read_tar(self.path(name), fs=self.fs)  # with the store's own storage options

    def read_first(self, name: str, limit: int) -> list[dict]:
        """The first `limit` samples of a committed shard, read as far as needed."""
        return read_tar(self.path(name), limit=limit, fs=self.fs)

    # ------------------------------------------------------------------ parts of a shard in the making
    @staticmethod
    def part_file(shard: str, name: str = "") -> str:
        """`_parts/{shard}` or a file in it, relative to the output's root (as `path` takes it)."""
        return f"{PARTS}/{shard}" + (f"/{name}" if name else "")

    def parts_done(self, shard: str) -> set[str]:
        """Names of the parts of `shard` whose stats (committed after their tars) exist."""
        folder = self.path(self.part_file(shard))
        self.fs.invalidate_cache(folder)
        if not self.fs.exists(folder):
            return set()
        files = [p.rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)]
        return {f[: -len(".json")] for f in files if f.endswith(".json")}

    def write_part_samples(self, shard: str, name: str, good: list[dict], rejected: list[dict]) -> None:
        """Commit one part's tar (and its rejects' tar); `commit_part` then marks it done."""
        self.fs.makedirs(self.path(self.part_file(shard)), exist_ok=True)
        self._commit_samples(good, self.part_file(shard, f"{name}.tar"))
        if rejected:
            self._commit_samples(rejected, self.part_file(shard, f"{name}.rejected.tar"))

    def commit_part(self, shard: str, name: str, stats: dict) -> None:
        """The part's stats, committed after its tars: from now on the part counts as done."""
        self.write_json(self.part_file(shard, f"{name}.json"), stats)

    def read_part_stats(self, shard: str, name: str) -> dict:
        return self.read_json(self.part_file(shard, f"{name}.json"))

    def assemble(self, shard: str, parts: list[str], stats: dict, with_rejects: list[str]) -> None:
        """Stream the committed `parts` (in order) into {shard}.tar, and the rejects' tars of the parts
        `with_rejects` into rejected/{shard}.tar; commit the tar, then its stats, then remove the parts.
        Memory: one tar member at a time."""
        if with_rejects:
            self.fs.makedirs(self.path("rejected"), exist_ok=True)
            tars = [self.part_file(shard, f"{p}.rejected.tar") for p in with_rejects]
            self._commit_concatenated(tars, f"rejected/{shard}.tar")
        self._commit_concatenated([self.part_file(shard, f"{p}.tar") for p in parts], f"{shard}.tar")
        crash_point("AFTER_TAR_COMMIT")  # tests only: the tar is committed, its stats are not yet
        self.write_json(f"{shard}.stats.json", stats)
        self.remove_parts(shard)

    def remove_parts(self, shard: str) -> None:
        folder = self.path(self.part_file(shard))
        if self.fs.exists(folder):
            self.fs.rm(folder, recursive=True)

    def remove_parts_folder_if_empty(self) -> None:
        """After a complete run: no shard is in the making, so `_parts/` goes too (after the parts of
        committed shards that a late writer left there)."""
        self.remove_committed_parts()
        folder = self.path(PARTS)
        self.fs.invalidate_cache(folder)
        if self.fs.exists(folder) and not self.fs.ls(folder, detail=False):
            self.fs.rm(folder, recursive=True)

    def _commit_samples(self, samples: list[dict], name: str) -> None:
        import webdataset as wds

        with self.committing(name) as f, wds.TarWriter(f, encoder=False, mtime=0) as w:
            for s in samples:
                w.write(s)

    def _commit_concatenated(self, tars: list[str], name: str) -> None:
        import tarfile

        with self.committing(name) as f, tarfile.open(fileobj=f, mode="w|") as out:
            for tar in tars:
                with self.fs.open(self.path(tar), "rb") as src, tarfile.open(fileobj=src, mode="r|") as part:
                    for member in part:
                        out.addfile(member, part.extractfile(member) if member.isfile() else None)

    def clean_temporaries(self) -> int:
        """Remove temporary files left by a crashed run (never committed shards), and the parts of shards
        that were committed before their parts could be removed."""
        if not self.fs.exists(self.root):
            return 0
        stale = [p for p in self.fs.ls(self.root, detail=False) if ".tmp-" in p.rsplit("/", 1)[-1]]
        for p in stale:
            self.fs.rm(p)
        stale += self.remove_committed_parts()
        if self.fs.exists(self.path(PARTS)):
            for folder in self.fs.ls(self.path(PARTS), detail=False):
                for p in self.fs.ls(folder, detail=False):  # a part's temporary file, left by a crash
                    if ".tmp-" in p.rsplit("/", 1)[-1]:
                        self.fs.rm(p)
                        stale.append(p)
        return len(stale)

    def remove_committed_parts(self) -> list[str]:
        """Remove the part folders of shards that are committed: left when a crash came between a shard's
        commit and its parts' removal, or written late by an actor that Ray had already given up (its node
        removed while it committed a part, and the shard assembled from a retry's). Returns them."""
        folder = self.path(PARTS)
        self.fs.invalidate_cache(folder)
        if not self.fs.exists(folder):
            return []
        committed, removed = self.committed(), []
        for sub in self.fs.ls(folder, detail=False):
            if sub.rstrip("/").rsplit("/", 1)[-1] in committed:
                self.fs.rm(sub, recursive=True)
                removed.append(sub)
        return removed

    def write_manifest(self, expected: list[str], job: dict) -> dict:
        """Rebuild manifest.json from every committed shard's stats."""
        shards, totals = [], {"written": 0, "rejected": {}, "seconds": 0.0}
        for name in sorted(self.committed()):
            st = self.read_json(f"{name}.stats.json")
            shards.append({"name": f"{name}.tar", "written": st["written"], "rejected": st["rejected"]})
            totals["written"] += st["written"]
            totals["seconds"] += st.get("timings", {}).get("total_s", 0.0)
            for reason, n in st["rejected"].items():
                totals["rejected"][reason] = totals["rejected"].get(reason, 0) + n
        done = {s["name"][:-4] for s in shards}
        manifest = {
            "job": job,
            "shards": shards,
            "totals": totals,
            "expected_shards": len(expected),
            "missing_shards": sorted(set(expected) - done),
            "complete": set(expected) <= done,
        }
        self.write_json(MANIFEST, manifest)
        return manifest
