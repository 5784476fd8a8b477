"""Loading a run configuration: YAML files in the paper's vocabulary, ``base:`` inheritance, typed overrides.

A config is a YAML mapping with the sections of ``RunConfig``. ``base:`` (a name or a list)
names configs it extends; later bases and the file itself win, mappings merge key by key.
Names resolve against the directory of the file that uses them, then ``configs/``.
Every key is checked against the schema: an unknown key fails naming the closest valid one,
a value of the wrong type fails naming the expected type, and ``validate`` rejects
impossible combinations (ratio >= 1, a block size that does not divide the hidden size,
more pattern updates than steps, ...). All of these raise ``ConfigError`` with one line.
"""

from __future__ import annotations

import copy
import difflib
import math
import types
import typing
from pathlib import Path
from dataclasses import MISSING, fields
from typing import Any

import yaml

from .schema import ConfigError, RunConfig
from .short_run import fit_micro_batch, rescale_to_steps

# In the checkout a link to the top-level configs/; in an installed wheel the copy it carries.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def config_names(directory: Path = CONFIG_DIR) -> list[str]:
    """The shipped configs (``configs/*.yaml``), by name."""
    return sorted(p.stem for p in directory.glob("*.yaml"))


# Keys renamed since configs were first written -> their names now. The old name is still read wherever a
# config comes from (config files, --set, sweep specs, saved run configs, checkpoints) and means the new one.
RENAMED_KEYS = {"sparsity.num_updates": "sparsity.segments"}


def canonical_key(dotted: str) -> str:
    """A dotted key under its current name (``sparsity.num_updates`` -> ``sparsity.segments``)."""
    return RENAMED_KEYS.get(dotted, dotted)


def rename_old_keys(raw: Any, where: str = "config") -> Any:
    """``raw`` with renamed keys under their current names (a new mapping where one was renamed); giving
    both the old and the new name is a ConfigError naming ``where``."""
    if not isinstance(raw, dict):
        return raw
    for old, new in RENAMED_KEYS.items():
        section, old_leaf = old.rsplit(".", 1)
        new_leaf = new.rsplit(".", 1)[1]
        node = raw.get(section)
        if isinstance(node, dict) and old_leaf in node:
            if new_leaf in node:
                raise ConfigError(f"{where}: {old} is the old name of {new}; give only {new}")
            raw = {**raw, section: {(new_leaf if k == old_leaf else k): v for k, v in node.items()}}
    return raw


def resolve_config_path(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    """A config name (``bert_mini_sparse``) or a path to a YAML file -> an existing path."""
    text = str(name_or_path)
    candidates = [Path(text)]
    if not text.endswith((".yaml", ".yml")):
        candidates.append(Path(text + ".yaml"))
    for directory in ([relative_to] if relative_to else []) + [CONFIG_DIR]:
        candidates += [directory / c for c in list(candidates) if not c.is_absolute()]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    close = difflib.get_close_matches(Path(text).stem, config_names(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; shipped configs are in {CONFIG_DIR}"
    raise ConfigError(f"config {text!r} not found{hint}")


def parse_yaml(text: str, path: Path | str) -> Any:
    """``yaml.safe_load(text)``; a one-line ConfigError naming ``path`` and the line otherwise (the one
    way configs, saved configs and sweep specs report broken YAML)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None


def read_yaml(path: Path) -> dict:
    """A YAML file holding a mapping (empty -> {}); one-line ConfigError otherwise."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    data = parse_yaml(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not a {type(data).__name__}")
    return data


def differing_key(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """``(dotted key, a's value, b's value)`` at the first place (sorted keys) where two nested
    config dicts differ; None when they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return differing_key(a.get(key), b.get(key), f"{prefix}{key}.")
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_raw(path: Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The merged mapping of ``path`` and its ``base:`` chain (not yet typed)."""
    path = path.resolve()
    if path in _chain:
        raise ConfigError(f"config inheritance loop: {' -> '.join(p.stem for p in _chain + (path,))}")
    data = rename_old_keys(read_yaml(path), str(path))
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: base must be a config name or a list of names")
    merged: dict = {}
    for base in bases:
        merged = _merge(merged, load_raw(resolve_config_path(base, path.parent), _chain + (path,)))
    return _merge(merged, data)


def load_config(name_or_path: str | Path, overrides: list[str] = (), *, steps: int | None = None,
                seed: int | None = None, world_size: int = 1) -> RunConfig:
    """Load, override (``section.key=value``), type-check and validate a config.

    ``steps`` (the ``--steps`` shortcut) shortens or lengthens the run; unless
    ``training.warmup_steps`` is overridden too, the warmup keeps its fraction of the run
    (the paper's 10k of 757k steps), so a short run still reaches its peak learning rate. Unless
    ``sparsity.segments`` or ``sparsity.update_every`` is set too, the number of segments is
    lowered so that each lasts at least ``sparsity.min_segment_steps`` (see ``short_run_segments``).
    ``log_every``, ``validate_every`` and ``checkpoint_every`` are lowered (never raised) so that the
    run has at least ``SHORT_RUN_EVENTS`` of each. Explicit ``--set`` values always win; what changed
    is kept in ``config.adjusted`` (``--describe`` prints it).
    """
    path = resolve_config_path(name_or_path)
    raw = load_raw(path)
    overridden = set()
    for item in overrides:
        key, value = parse_override(item)
        _set_path(raw, key, value)
        overridden.add(key)
    adjusted = rescale_to_steps(raw, steps, overridden) if steps is not None else {}
    adjusted.update(fit_micro_batch(raw, overridden, world_size))
    if seed is not None:
        _set_path(raw, "seed", seed)
    config = from_dict(raw)
    config.name = config.name or path.stem
    config.adjusted = adjusted
    return config.validate()


def parse_override(item: str) -> tuple[str, Any]:
    """``section.key=value``; the value is read as YAML (``0.9``, ``true``, ``null``, ``[a, b]``)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, text = item.split("=", 1)
    key = canonical_key(key.strip())
    if not key:
        raise ConfigError(f"--set {item!r}: the key is empty")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def _set_path(raw: dict, dotted: str, value: Any) -> None:
    _lookup_field(RunConfig, dotted.split("."), dotted)  # unknown keys fail here, with a suggestion
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _all_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        sub = _section_class(f)
        keys += _all_keys(sub, f"{prefix}{f.name}.") if sub else [f"{prefix}{f.name}"]
    return keys


def _section_class(f) -> type | None:
    return f.default_factory if f.default_factory is not MISSING and hasattr(f.default_factory, "__dataclass_fields__") else None


def _lookup_field(cls, parts: list[str], dotted: str, section_ok: bool = False):
    by_name = {f.name: f for f in fields(cls)}
    f = by_name.get(parts[0])
    is_section = f is not None and bool(_section_class(f))
    if f is None or (len(parts) > 1 and not is_section) or (len(parts) == 1 and is_section and not section_ok):
        close = difflib.get_close_matches(dotted, _all_keys(), n=1, cutoff=0.5)
        if not close:
            close = difflib.get_close_matches(parts[-1], [k.split(".")[-1] for k in _all_keys()], n=1)
            close = [k for k in _all_keys() if close and k.endswith("." + close[0])][:1]
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown config key {dotted!r}{hint}")
    if len(parts) > 1:
        return _lookup_field(_section_class(f), parts[1:], dotted, section_ok)
    return f


def from_dict(raw: dict) -> RunConfig:
    """A typed RunConfig from a merged mapping (old key names read as their new ones); unknown keys and
    wrong types fail with one line."""
    return _build(RunConfig, rename_old_keys(raw), "")


def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        f = _lookup_field(RunConfig, dotted.split("."), dotted, section_ok=True)
        sub = _section_class(f)
        kwargs[key] = _build(sub, value, dotted + ".") if sub else _coerce(dotted, value, hints[key])
    return cls(**kwargs)


def _coerce(key: str, value: Any, annotation) -> Any:
    """Check ``value`` against the field's annotation (ints are accepted where floats are)."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if isinstance(value, str) and (int in options or float in options):
        try:  # YAML 1.1 reads 1e-3 as a string, also where a name is allowed too ("auto" | a number)
            number = float(value)
        except ValueError:
            number = None
        if number is not None and math.isfinite(number):
            value = number
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is list and isinstance(value, list):
            (item,) = typing.get_args(option) or (str,)
            try:
                return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
            except ConfigError:
                pass
        if option is int and isinstance(value, float) and value.is_integer() and not isinstance(value, bool):
            return int(value)  # 1e4 in YAML
    names = " or ".join(_type_name(o) for o in options)
    raise ConfigError(f"{key} must be {names}, got {value!r} ({type(value).__name__})")


def _type_name(option) -> str:
    if option is type(None):
        return "null"
    if typing.get_origin(option) is list:
        (item,) = typing.get_args(option) or (str,)
        return {int: "a list of integers", float: "a list of numbers"}.get(item, "a list of names")
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(option, str(option))
