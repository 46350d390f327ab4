"""Run configuration: a YAML file (``yaml.safe_load``) validated against a dataclass schema, plus
``key=value`` overrides with dotted keys::

    method: {name: <registered method>, ...the method's own config keys...}
    data:   DataConfig      (source, batch_size per rank, backend, num_workers, recipe options)
    optim:  OptimConfig     (fastkd.train.options)
    train:  TrainConfig     (fastkd.train.options)

An unknown key is an error naming the nearest valid one; ``method``'s keys are checked by the
method's config dataclass (``fastkd.methods.build_method``). Override values are parsed as YAML
(``optim.betas=[0.9,0.95]``); ``1e-3`` (a string to YAML 1.1) is accepted where a float is expected.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fastkd.checks import check_bool, check_kwargs, check_str
from fastkd.data.loader import check_loader_options
from fastkd.suggest import did_you_mean
from fastkd.train.options import OptimConfig, TrainConfig

_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema."""


@contextlib.contextmanager
def config_errors(where: str = ""):
    """Re-raise a ``TypeError`` / ``ValueError`` of the block (a ``fastkd.checks`` check) as a
    :class:`ConfigError`, its message prefixed with ``where``."""
    try:
        yield
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}{error}") from None


@dataclass
class DataConfig:
    """``source``: ImageFolder root or file list; ``batch_size``: images per rank per
    micro-batch; ``recipe``: view recipe (default: the method's ``recipe``); ``exclude``: an
    exclusion list from ``fastkd data scan``; ``skip_bad_images``: drop undecodable images from
    their batches (counted, each file warned about once) instead of stopping with an error (torch
    backend only); ``recipe_options``: extra keyword arguments of ``fastkd.data.build_loader``
    (recipe overrides such as the number of local crops)."""

    source: str = ""
    batch_size: int = 64
    backend: str = "auto"
    num_workers: int = 2
    recipe: str | None = None
    exclude: str | None = None
    drop_last: bool = True
    skip_bad_images: bool = False
    recipe_options: dict = field(default_factory=dict)

    def __post_init__(self):
        with config_errors():
            check_str("data.source", self.source, empty=True)
            check_loader_options("data.", backend=self.backend, batch_size=self.batch_size,
                                 num_workers=self.num_workers, skip_bad_images=self.skip_bad_images)
            check_bool("data.drop_last", self.drop_last)
            check_kwargs("data.recipe_options", self.recipe_options)


@dataclass
class RunConfig:
    """A whole run: ``method`` (a dict with ``name``), ``data``, ``optim``, ``train``."""

    method: dict
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def method_name(self) -> str:
        return self.method["name"]

    @property
    def method_config(self) -> dict:
        """The method's own keys (everything in ``method`` but ``name``)."""
        return {k: v for k, v in self.method.items() if k != "name"}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _mapping(value, what: str) -> dict:
    """``value`` if it is a dict, else a :class:`ConfigError` naming ``what``."""
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a mapping, got {type(value).__name__}: {value!r}")
    return value


def _check_keys(mapping: dict, valid: list[str], where: str) -> None:
    """An unknown key of ``mapping`` is a :class:`ConfigError` naming it (prefixed by ``where``)
    and the nearest valid key."""
    for key in mapping:
        if key not in valid:
            hint = did_you_mean(str(key), valid, prefix=where)
            raise ConfigError(f"unknown config key '{where}{key}'{hint} (valid keys: {', '.join(sorted(valid))})")


def _coerce(value, annotation):
    """Turn a YAML 1.1 string such as ``'1e-3'`` into a float (and an int into a float) where the
    schema expects a float; everything else is returned as is."""
    if annotation is float or (isinstance(annotation, types.UnionType) and float in typing.get_args(annotation)):
        if (isinstance(value, str) and _FLOAT.match(value.strip())) or (type(value) is int):
            return float(value)
    return value


def build_dataclass(cls, mapping, where: str = ""):
    """Instantiate dataclass ``cls`` from ``mapping``; an unknown key raises :class:`ConfigError`
    naming it (prefixed by ``where``, e.g. ``"optim."``) and the nearest valid key."""
    assert dataclasses.is_dataclass(cls), cls
    mapping = _mapping({} if mapping is None else mapping, where.rstrip(".") or "config")
    hints = typing.get_type_hints(cls)
    _check_keys(mapping, [f.name for f in dataclasses.fields(cls)], where)
    with config_errors():
        return cls(**{key: _coerce(value, hints[key]) for key, value in mapping.items()})


def parse_override(text: str) -> tuple[list[str], object]:
    """``"a.b.c=value"`` -> ``(["a", "b", "c"], yaml value)``."""
    key, equals, raw = text.partition("=") if isinstance(text, str) else ("", "", "")
    parts = key.strip().split(".")
    if not equals or not all(parts):
        raise ConfigError(f"override must look like key=value (dotted keys without empty components), got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({error})") from None
    return parts, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of the nested dict ``raw`` with every ``key=value`` override set."""
    out = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[:depth + 1])} is not a mapping")
            node = child
        node[parts[-1]] = value
    return out


def run_config_from_dict(raw: dict) -> RunConfig:
    """A whole run's :class:`RunConfig` from a nested dict, validated against the schema. (A method's
    own config dataclass is built by :func:`fastkd.methods.base.method_config_from_dict`.)"""
    _check_keys(_mapping(raw, "the top level"), [f.name for f in dataclasses.fields(RunConfig)], "")
    method = raw.get("method")
    if isinstance(method, str):
        method = {"name": method}
    if not isinstance(method, dict) or not isinstance(method.get("name"), str):
        raise ConfigError(f"config key 'method' must be a mapping with a 'name' (a registered method), got {method!r}")
    return RunConfig(method, *(build_dataclass(cls, raw.get(key), f"{key}.")
                               for key, cls in (("data", DataConfig), ("optim", OptimConfig), ("train", TrainConfig))))


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> RunConfig:
    """Read the YAML file ``path`` (safe loader), apply ``overrides`` and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
        return run_config_from_dict(apply_overrides(_mapping({} if raw is None else raw, "the top level"),
                                                    list(overrides)))
    except (yaml.YAMLError, ConfigError) as error:
        raise ConfigError(f"{path}: {'not valid YAML: ' if isinstance(error, yaml.YAMLError) else ''}{error}") from None
