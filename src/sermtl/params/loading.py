"""Reading params.yaml: pydantic checks each section, its errors are told as "file: key.path: what is
allowed", and the checks that tie fields together run on the sections as written and on every profile."""

from __future__ import annotations

import dataclasses
import operator
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from sermtl.params.rules import Invalid, did_you_mean
from sermtl.params.sections import SECTIONS, Params

DEFAULT_PARAMS_PATH = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml is missing, malformed or holds an unknown, mistyped or nonsensical key."""


# Fields ordered against each other: (key, relation, other key), on the merged parameters.
ORDER = (
    ("data.thresholds.low_max", "<", "data.thresholds.high_min"),
    ("validation.min_duration_s", "<", "validation.max_duration_s"),
    ("features.hop_ms", "<=", "features.frame_ms"),  # a longer hop would skip audio between frames
    ("serving.min_duration_s", "<", "serving.max_duration_s"),
    ("serving.max_total_duration_s", ">=", "serving.max_duration_s"),
)
_RELATIONS = {"<": (operator.lt, "below"), "<=": (operator.le, "at most"), ">=": (operator.ge, "at least")}

# Keys that an older params.yaml may still hold: key path -> what to write instead (also under profiles.*).
REPLACED_KEYS = {
    "train.seed": "replaced by train.seeds, a list of seeds (write `seeds: [0]` for one run as before)",
    "registry.promotion.tolerance": (
        "replaced by registry.promotion.margin, with another meaning: `tolerance` was a shortfall of the "
        "mean UAR, `margin` is how far below 0 the lower bound of the confidence interval of (challenger - "
        "champion) UAR may reach on every dimension; rename the key to `margin` and review its value "
        "(default 0.01, one UAR point)"
    ),
}


def _inconsistencies(p: Params) -> Iterator[tuple[str, str]]:
    """(key path, what is wrong) for each rule that ties fields together, on the merged parameters."""
    for key, relation, other in ORDER:
        value, bound = operator.attrgetter(key)(p), operator.attrgetter(other)(p)
        holds, words = _RELATIONS[relation]
        if not holds(value, bound):
            yield key, f"must be {words} {other} = {bound:g} (got {value:g})"
    f, m, rate, serving = p.features, p.model, p.data.sample_rate, p.serving
    frame, needed = round(f.frame_ms * rate / 1000), m.conv_kernel * (m.conv_pool + 1) - 1  # as ModelConfig
    if frame < needed:
        why = f"features.frame_ms = {f.frame_ms} at data.sample_rate = {rate} gives {frame}"
        yield (
            "model.conv_kernel",
            f"{m.conv_kernel} with model.conv_pool = {m.conv_pool} needs frames of {needed}+ samples; {why}",
        )
    if serving.min_duration_s * 1000 + 1e-9 < f.frame_ms:
        frame_s = f"features.frame_ms = {f.frame_ms} ms"
        yield (
            "serving.min_duration_s",
            f"must be one frame or more, {frame_s} (got {serving.min_duration_s:g})",
        )
    systems, proposed = ", ".join(p.systems), p.eval.proposed_system
    if not p.systems:
        yield "systems", "must define at least one system"
    if proposed not in p.systems:
        yield "eval.proposed_system", f"must be one of the systems {systems} (got {proposed!r})"
    for i, baseline in enumerate(p.significance.baselines):
        if baseline == proposed or baseline not in p.systems:
            others = f"the systems {systems} other than eval.proposed_system"
            yield f"significance.baselines[{i}]", f"must be one of {others} (got {baseline!r})"
    for i, toleration in enumerate(p.cluster.gpu.tolerations):
        where = f"cluster.gpu.tolerations[{i}]"
        if toleration.operator == "Exists" and toleration.value:
            yield f"{where}.value", f"must be empty when operator is Exists (got {toleration.value!r})"
        if toleration.operator == "Equal" and not toleration.key:
            yield f"{where}.key", "must be set when operator is Equal"


def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _unknown(where: str, key: Any, names: tuple[str, ...], noun: str) -> Invalid:
    for old, instead in REPLACED_KEYS.items():
        if where == old or where.endswith(f".{old}"):
            return Invalid(where, f"no longer a key: {instead}")
    hint = did_you_mean(key, names)
    return Invalid(where, f"unknown {noun}{hint} (expected one of: {', '.join(map(str, names))})")


def _known(raw: dict[str, Any], path: str, names: tuple[str, ...], noun: str) -> None:
    for key in raw:
        if key not in names:
            raise _unknown(_join(path, key), key, names, noun)


def _bare(hint: Any) -> Any:
    """The type under Annotated[...]."""
    return typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint


def _hints(cls: type) -> dict[str, Any]:
    return {name: _bare(hint) for name, hint in typing.get_type_hints(cls).items()}


def _type_at(loc: tuple[Any, ...]) -> Any:
    """The declared type at an error's location in Params (None past what types can say)."""
    hint: Any = Params
    for i, key in enumerate(loc):
        hint, origin = _bare(hint), typing.get_origin(_bare(hint))
        if key == "[key]":  # pydantic's mark after a mapping's key: the key's type was taken already
            continue
        if dataclasses.is_dataclass(hint):
            hint = _hints(hint).get(key)
        elif origin is list:
            hint = typing.get_args(hint)[0]
        elif origin is dict:
            hint = typing.get_args(hint)[0 if loc[i + 1 :] == ("[key]",) else 1]
        else:
            return None
    return _bare(hint)


_TYPE_WORDS = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str"}


def _told(error: dict[str, Any], prefix: str) -> Invalid:
    """One pydantic error in the project's words, at its key path under `prefix`."""
    loc, kind, value = tuple(error["loc"]), error["type"], error.get("input")
    keys = [k for k in loc if k != "[key]"]
    path = prefix
    for key in keys:
        path = _join(path, key)
    if kind == "rule":
        return Invalid(path + error["ctx"]["suffix"], error["ctx"]["message"])
    if kind == "unexpected_keyword_argument":
        parent = _type_at(loc[:-1])
        return _unknown(path, loc[-1], tuple(f.name for f in dataclasses.fields(parent)), "key")
    if kind == "literal_error":
        allowed = typing.get_args(_type_at(loc))
        if loc[-1] == "[key]":
            hint, names = did_you_mean(keys[-1], allowed), ", ".join(allowed)
            return Invalid(path, f"unknown key{hint} (expected one of: {names})")
        words = ", ".join(word or '""' for word in allowed)
        return Invalid(path, f"must be one of {words} (got {value!r})")
    if kind in _TYPE_WORDS:
        return Invalid(path, f"expected {_TYPE_WORDS[kind]}, got {value!r}")
    if kind == "list_type":
        return Invalid(path, f"expected a list, got {value!r}")
    if kind == "dict_type":
        return Invalid(path, f"expected a mapping, got {value!r}")
    if kind == "dataclass_type":
        return Invalid(path, f"expected a mapping, got {type(value).__name__}")
    return Invalid(path, error["msg"])


def _with_defaults(cls: type, raw: Any, base: Any) -> Any:
    """`raw` with each section it writes filled from `base`'s value of that section, so that a key left out
    keeps its field's default (e.g. cluster.steps.train's own requests), not its class's."""
    if not isinstance(raw, dict):
        return raw
    hints, filled = _hints(cls), {}
    for key, value in raw.items():
        hint = hints.get(key)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            default = getattr(base, key)
            value = {f.name: getattr(default, f.name) for f in dataclasses.fields(hint)} | _with_defaults(
                hint, value, default
            )
        filled[key] = value
    return filled


_PARAMS = TypeAdapter(Params)


def _build(raw: dict[str, Any], prefix: str = "") -> Params:
    try:
        return _PARAMS.validate_python(_with_defaults(Params, raw, Params()))
    except ValidationError as exc:
        problems = [_told(error, prefix) for error in exc.errors()]
    if len(problems) == 1:
        raise problems[0]
    raise Invalid("", "\n".join(str(problem) for problem in problems))


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in override.items()}}
    return override


def _consistent(params: Params, suffix: str = "") -> Params:
    for path, message in _inconsistencies(params):
        raise Invalid(path, message + suffix)
    return params


def _read(raw: Any) -> Params:
    """The sections as written (profile `paper`) and each profile merged over them, all checked; the one
    `profile` names is returned."""
    if not isinstance(raw, dict):
        raise Invalid("", f"expected a mapping of sections at the top level, got {type(raw).__name__}")
    _known(raw, "", ("profile", *SECTIONS, "profiles"), "section")
    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise Invalid("profiles", f"expected a mapping of profile name -> sections, got {profiles!r}")
    written = {k: v for k, v in raw.items() if k != "profiles"}
    paper = _consistent(_build(written))
    merged = {}
    for name, overrides in profiles.items():
        path = f"profiles.{name}"
        if name == "paper":
            raise Invalid(path, "'paper' is the sections as written; a profile of that name would be ignored")
        if not isinstance(overrides, dict):
            raise Invalid(path, f"expected a mapping of sections, got {overrides!r}")
        _known(overrides, path, SECTIONS, "section")
        _build(overrides, path)  # the overrides alone, so that an error names the key as written
        profile = dataclasses.replace(_build(_merge(written, overrides)), profile=name)
        merged[name] = _consistent(profile, f" (with {path} merged)")
    selected = paper.profile
    if selected == "paper":
        return paper
    if selected not in merged:
        known = ["paper", *map(str, merged)]
        hint = did_you_mean(selected, known)
        raise Invalid("profile", f"unknown profile {selected!r}{hint} (expected one of: {', '.join(known)})")
    return merged[selected]


def params_from_dict(raw: dict[str, Any], where: str = "params") -> Params:
    """Typed, checked parameters; a ParamsError names `where` (the file), the key path and what is allowed."""
    try:
        return _read(raw)
    except Invalid as exc:
        lines = str(exc).split("\n")
        raise ParamsError("\n".join(f"{where}: {line}" for line in lines)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML keeps the last of two equal keys, silently; params.yaml refuses them."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, str | int | float) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is written twice in one mapping", key_node.start_mark
            )
        seen.add(key if isinstance(key, str | int | float) else id(key_node))
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def params_from_yaml(text: str, where: str = "params.yaml") -> Params:
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ParamsError(f"{where}: not valid YAML: {' '.join(str(problem).split())}{at}") from exc
    return params_from_dict(raw, where)


def load_params(path: Path | str = DEFAULT_PARAMS_PATH) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: parameter file not found (run from the repository root or pass --params)")
    return params_from_yaml(path.read_text(), str(path))
