"""Input listing: image files or WebDataset shards from a folder, a glob or a list file, on any fsspec URL.

list_images("s3://bucket/birds/")          every image under the folder (recursive)
list_images("data/*.png")                  a glob
list_images("urls.txt")                    one URL per line ('#' comments)
list_shards("out/birds-label")             the committed shards of a job's output folder (top level)
"""

from __future__ import annotations

from factory.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
SHARD_EXTENSIONS = (".tar",)


class InputNotFound(UserError, FileNotFoundError):
    """A folder, glob or list that names no input files."""


def list_files(source: str, extensions: tuple[str, ...], what: str, recursive: bool = True) -> list[str]:
    """URLs of the files with `extensions` that `source` names, sorted. Raises InputNotFound if none."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(source)
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]

    def url(p: str) -> str:
        return p if proto in ("file", "local") else f"{proto}://{p}"

    if any(ch in source for ch in "*?["):
        found = fs.glob(path)
    elif fs.isdir(path):
        found = fs.find(path) if recursive else fs.ls(path, detail=False)
    elif fs.isfile(path) and path.endswith((".txt", ".lst")):
        with fs.open(path, "r") as f:
            return [line.strip() for line in f if line.strip() and not line.startswith("#")]
    elif fs.isfile(path):
        found = [path]
    else:
        raise InputNotFound(f"no {what} at {source!r}: give a folder, a glob or a .txt list of {what} URLs")
    files = sorted(url(p) for p in found if p.lower().endswith(extensions))
    if not files:
        raise InputNotFound(f"{source!r} holds no {what} ({', '.join(extensions)})")
    return files


def list_images(source: str) -> list[str]:
    return list_files(source, IMAGE_EXTENSIONS, "images")


def list_shards(source: str) -> list[str]:
    """Shards of a job's output folder (its top level only: rejected/ holds rejects), a glob or a list."""
    return list_files(source, SHARD_EXTENSIONS, "shards", recursive=False)


def storage_path(uri: str) -> str:
    """A Ray Train storage_path: URLs (s3://, gs://) as they are, local folders made absolute."""
    from pathlib import Path

    return uri if "://" in uri else str(Path(uri).expanduser().resolve())
