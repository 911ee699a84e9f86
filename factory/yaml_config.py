"""Every config of the project (jobs, fine-tuning, students) is a YAML file validated by one strict pydantic
model before any work, with `--set KEY=VALUE` overrides by dotted path (list items by index):

    cfg = load_yaml_config("configs/toyworld.yaml", ["output.uri=/tmp/x", "concepts.0.samples=10"], JobConfig)

`StrictConfig` is the base of every config model (unknown keys are errors); a mistake in the file or an
override is one `ConfigError` (a `UserError`) that lists every problem. Values are parsed as YAML scalars.
No torch here: a YAML is checked before any model library loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from factory.errors import UserError


class StrictConfig(BaseModel):
    """The base of every config model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


M = TypeVar("M", bound=BaseModel)


class ConfigError(UserError, ValueError):
    """A configuration is invalid; the message lists every problem."""


def set_path(data: dict, path: str, value) -> None:
    """`data[k1][k2]... = value` for a dotted `path` (list items by index); missing dicts are made."""
    keys = path.strip().split(".")
    node = data
    for k in keys[:-1]:
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise ConfigError(f"--set {path}: {k!r} is not an index of a list of {len(node)}")
            node = node[int(k)]
        else:
            node = node.setdefault(k, {})
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {path}: {last!r} is not an index of a list of {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def apply_override(data: dict, item: str) -> None:
    """One `KEY=VALUE` (dotted path, list items by index; the value parsed as YAML) applied to `data`."""
    if "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    path, raw = item.split("=", 1)
    set_path(data, path, yaml.safe_load(raw) if raw.strip() else "")


def with_values(cfg: M, values: dict) -> M:
    """A copy of the config `cfg` with `{dotted.path: value}` set (typed values, not strings), validated
    again: how one command hands another its settings (`trainers toyworld-tables`)."""
    data = cfg.model_dump()
    for path, value in values.items():
        set_path(data, path, value)
    return validate_config(data, type(cfg))


def validate_config(data: dict, model: type[M], overrides: list[str] | None = None, source: str = "") -> M:
    """`data` with the `--set` overrides applied, validated as `model`; ConfigError lists every problem."""
    for item in overrides or []:
        apply_override(data, item)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = [f"  {'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"invalid config{' ' + source if source else ''}:\n" + "\n".join(lines)) from None


def load_yaml_config(path: str | Path, overrides: list[str] | None, model: type[M]) -> M:
    """The YAML at `path` with `--set` overrides, validated as `model` (a `StrictConfig`) up front.

    Raises:
        ConfigError: the file is missing or not YAML, or the config is invalid; one line per problem.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p} is not valid YAML: {err}") from err
    return validate_config(data, model, overrides, str(p))
