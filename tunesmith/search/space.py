"""The search space: which config fields a search varies, over what values, and when.

A space is YAML mapping tunesmith config paths to what they range over:

    train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}    # float (the field's type), log scale
    method.r: [4, 8, 16, 32]                             # categorical (a list)
    train.epochs: {type: int, low: 1, high: 3}
    method.alpha: {choices: [8, 16, 32], when: {method.name: [lora, dora]}}   # only for those methods

Every problem is found before any trial runs: `load_space` checks the file's shape (naming its
line), `Space.check` tries the base config with the space's corners (each categorical choice,
numbers at their bounds) through the ordinary config validation, so an unknown field, a value the
field refuses or a method option given to a method without it is an error naming the parameter.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from tunesmith.config import RunConfig, field_info, load_config
from tunesmith.errors import ConfigError

Kind = Literal["float", "int", "categorical"]
_SPEC_KEYS = {"type", "low", "high", "log", "step", "choices", "when", "grid"}
# Fields a search sets itself, or that would change what the trials are compared on.
_NOT_SEARCHABLE = {"task": "the search compares trials of one task", "train.metric": "it is the search's objective",
                   "output": "the search names each trial's run folder"}
MAX_CORNERS = 256  # beyond this many categorical combinations, each choice is checked on its own
MAX_INT_GRID = 32  # an int range becomes a grid of all its values up to this many


class SpaceError(ConfigError):
    """A search space that cannot be searched; the message names the file, line and parameter."""


@dataclass(frozen=True)
class Param:
    """One searched config field."""

    name: str  # dotted config path, e.g. train.lr
    kind: Kind
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # dotted name -> allowed values
    grid: tuple[Any, ...] | None = None  # the values a grid search takes (numbers: given or the int range)
    line: int | None = None  # in the space file

    def grid_values(self) -> tuple[Any, ...]:
        if self.kind == "categorical":
            return self.choices
        if self.grid is None:
            raise SpaceError(f"{self.name}: a grid search needs its values: add grid: [...]")
        return self.grid

    def decode(self, value: Any) -> Any:
        return _decode(value)

    def where(self, source: str) -> str:
        return f"{source}:{self.line}: {self.name}" if self.line else f"{source}: {self.name}"


_JSON = "json:"  # a categorical choice that is a list or mapping travels through optuna as text


def _encode(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else _JSON + json.dumps(value)


def _decode(value: Any) -> Any:
    return json.loads(value[len(_JSON):]) if isinstance(value, str) and value.startswith(_JSON) else value


def decode_params(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's params (as optuna stores them) as config overrides."""
    return {k: _decode(v) for k, v in params.items()}


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]  # conditions before the parameters that depend on them
    source: str  # the file, or "the default space for method lora"

    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def suggest(self, trial, base: dict[str, Any], grid: bool = False) -> dict[str, Any]:
        """Ask `trial` for a value of each parameter whose condition holds: config overrides."""
        chosen: dict[str, Any] = {}
        for p in self.params:
            if not _holds(p, chosen, base):
                continue
            if grid or p.kind == "categorical":
                values = p.grid_values() if grid else p.choices
                value = trial.suggest_categorical(p.name, [_encode(v) for v in values])
            elif p.kind == "int":
                value = trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
            else:
                value = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
            chosen[p.name] = p.decode(value)
        return chosen

    def grid(self, base: dict[str, Any]) -> list[dict[str, Any]]:
        """Every combination of the parameters' grid values, each with only the parameters its
        conditions allow (so `r` is not multiplied in for a method without it); no duplicates.
        Values as optuna stores them (lists and mappings encoded), ready to enqueue."""
        points, seen = [], set()
        for combo in itertools.product(*(p.grid_values() for p in self.params)):
            point: dict[str, Any] = {}
            for p, v in zip(self.params, combo):
                if _holds(p, {k: _decode(x) for k, x in point.items()}, base):
                    point[p.name] = _encode(v)
            key = json.dumps(point, sort_keys=True)
            if key not in seen:
                seen.add(key)
                points.append(point)
        return points

    def as_dict(self) -> dict[str, Any]:
        """A plain description, stored with the study so a rerun can tell it is the same space."""
        return {p.name: {k: v for k, v in (("type", p.kind), ("low", p.low), ("high", p.high), ("log", p.log),
                                             ("step", p.step), ("choices", list(p.choices)),
                                             ("when", {k: list(v) for k, v in p.when.items()}),
                                             ("grid", list(p.grid) if p.grid is not None else None))
                         if v not in (None, False, [], {})} for p in self.params}

    def check(self, config: str | Path | dict, overrides: dict[str, Any]) -> None:
        """Validate the base config with the space's corners before any trial runs.

        Raises:
            SpaceError: naming the parameters (and values) the config refuses.
        """
        base = load_config(config, overrides).model_dump(mode="json")
        problems = [f"{p.where(self.source)}: its condition "
                    f"{', '.join(f'{k} in {list(v)}' for k, v in p.when.items())} never holds "
                    "(the config's value is not allowed and the space does not search that field)"
                    for p in self.params if not _can_hold(p, self, base)]
        if problems:
            raise SpaceError(f"{self.source}: contradictory space:\n" + "\n".join(f"  - {m}" for m in problems))
        seen: dict[str, str] = {}
        for corner in self._corners(base):
            try:
                load_config(config, {**overrides, **corner})
            except ConfigError as e:
                lines = [ln.strip() for ln in str(e).splitlines()[1:]] or [str(e)]
                for ln in lines:
                    seen.setdefault(ln, ", ".join(f"{k}={v!r}" for k, v in corner.items()))
        if seen:
            items = list(seen.items())
            shown = "\n".join(f"  {ln}   [with {where}]" for ln, where in items[:10])
            more = f"\n  ... and {len(items) - 10} more" if len(items) > 10 else ""
            raise SpaceError(f"{self.source}: the config refuses values of the space ({', '.join(self.names())}):"
                             f"\n{shown}{more}")

    def _corners(self, base: dict[str, Any]) -> list[dict[str, Any]]:
        """Categorical combinations (or each choice alone, when there are too many) x numbers at
        their low and at their high bound; each with only the parameters its conditions allow."""
        cats = [p for p in self.params if p.kind == "categorical"]
        nums = [p for p in self.params if p.kind != "categorical"]
        n_combos = 1
        for p in cats:
            n_combos *= len(p.choices)
        if n_combos <= MAX_CORNERS:
            combos = [dict(zip([p.name for p in cats], c)) for c in itertools.product(*(p.choices for p in cats))]
        else:
            combos = [{p.name: c} for p in cats for c in p.choices]
        corners = []
        for combo in combos:
            for end in ("low", "high"):
                values = {**combo, **{p.name: _number(p, getattr(p, end)) for p in nums}}
                point: dict[str, Any] = {}
                for p in self.params:
                    if p.name in values and _holds(p, point, base):
                        point[p.name] = values[p.name]
                corners.append(point)
        return corners


def _number(p: Param, v: float | None) -> Any:
    return int(v) if p.kind == "int" and v is not None else v


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _holds(p: Param, chosen: dict[str, Any], base: dict[str, Any]) -> bool:
    return all((chosen[k] if k in chosen else _lookup(base, k)) in allowed for k, allowed in p.when.items())


def _can_hold(p: Param, space: Space, base: dict[str, Any]) -> bool:
    by_name = {q.name: q for q in space.params}
    for k, allowed in p.when.items():
        q = by_name.get(k)
        values = q.choices if q is not None and q.kind == "categorical" else [_lookup(base, k)]
        if q is not None and q.kind != "categorical":
            return True  # a number conditioned on: its values are not enumerated
        if not any(v in allowed for v in values):
            return False
    return True


# ---------------------------------------------------------------- reading a space file
def load_space(path: str | Path) -> Space:
    """Read a space YAML file.

    Raises:
        SpaceError: every problem found, each naming the file, line and parameter.
    """
    p = Path(path)
    if not p.is_file():
        raise SpaceError(f"search space file not found: {p.absolute()}")
    text = p.read_text()
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            tree = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise SpaceError(f"{p}: not valid YAML: {e}") from None
    if tree is None or tree == {}:
        raise SpaceError(f"{p}: the space is empty: give at least one parameter, e.g. "
                         "train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}")
    if not isinstance(tree, dict):
        raise SpaceError(f"{p}: the top level must map config fields (train.lr, method.r, ...) to their ranges")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    return parse_space(tree, str(p), lines)


def parse_space(tree: dict[str, Any], source: str, lines: dict[str, int] | None = None) -> Space:
    """A Space from a parsed mapping (a file's, or a built-in default)."""
    lines = lines or {}
    params, problems = [], []
    for name, spec in tree.items():
        where = f"{source}:{lines[name]}: {name}" if name in lines else f"{source}: {name}"
        try:
            params.append(_param(str(name), spec, lines.get(name)))
        except SpaceError as e:
            problems.append(f"{where}: {e}")
    names = {p.name for p in params}
    for p in params:
        for cond in p.when:
            if cond == p.name:
                problems.append(f"{p.where(source)}: its condition names the parameter itself")
            elif cond not in names and _field(cond) is None:
                problems.append(f"{p.where(source)}: its condition names {cond}, which is not a config field")
    ordered, cycle = _order(params)
    if cycle:
        problems.append(f"{source}: conditions form a cycle: {' -> '.join(cycle)}")
    if problems:
        raise SpaceError(f"{source}: {len(problems)} problem(s) in the search space:\n"
                         + "\n".join(f"  - {m}" for m in problems))
    if not params:
        raise SpaceError(f"{source}: the space is empty")
    return Space(tuple(ordered), source)


def _field(dotted: str):
    """The pydantic field of a dotted config path, or None when there is no such field (a section,
    such as `train`, is not a field)."""
    info = field_info(dotted)
    ann = info.annotation if info is not None else None
    return None if isinstance(ann, type) and issubclass(ann, BaseModel) else info


def _param(name: str, spec: Any, line: int | None) -> Param:
    import difflib

    for prefix, why in _NOT_SEARCHABLE.items():
        if name == prefix or name.startswith(prefix + "."):
            raise SpaceError(f"cannot be searched: {why}")
    info = _field(name)
    if info is None:
        section, _, key = name.rpartition(".")
        options = [f"{section}.{n}" if section else n for n in _names(section)]
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else (f"; {section} has: {', '.join(_names(section))}"
                                                             if _names(section) else "")
        raise SpaceError(f"unknown config field{hint}")
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise SpaceError("expected a list of choices or a mapping such as {low: 1.0e-5, high: 1.0e-3, log: true}, "
                         f"got {spec!r}")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise SpaceError(f"unknown key(s) {', '.join(sorted(map(str, unknown)))}; a parameter takes "
                         f"{', '.join(sorted(_SPEC_KEYS))}")
    when = _when(spec.get("when"))
    kind = spec.get("type") or ("categorical" if "choices" in spec else _numeric_kind(str(info.annotation)))
    if kind not in ("float", "int", "categorical"):
        raise SpaceError(f"type: expected float, int or categorical, got {kind!r}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError("choices: give a non-empty list")
        choices = [_maybe_float(c) for c in choices]
        if len({json.dumps(c, sort_keys=True) for c in choices}) < len(choices):
            raise SpaceError(f"choices: {choices} repeats a value")
        extra = set(spec) - {"type", "choices", "when"}
        if extra:
            raise SpaceError(f"{', '.join(sorted(extra))}: only for numbers; a categorical parameter takes choices")
        return Param(name, "categorical", choices=tuple(choices), when=when, line=line)
    if "choices" in spec:
        raise SpaceError(f"choices: a {kind} parameter takes low and high (or drop type for a categorical one)")
    low, high, step = (_maybe_float(spec.get(k)) for k in ("low", "high", "step"))
    log = spec.get("log", False)
    for key, v in (("low", low), ("high", high)):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise SpaceError(f"{key}: expected a number, got {v!r}")
    if kind == "int" and not all(float(v).is_integer() for v in (low, high)):
        raise SpaceError(f"low/high: an int parameter needs whole numbers, got {low}, {high}")
    if not low < high:
        raise SpaceError(f"low ({low}) must be below high ({high})")
    if not isinstance(log, bool):
        raise SpaceError(f"log: expected true or false, got {log!r}")
    if log and low <= 0:
        raise SpaceError(f"log: a log scale needs low > 0, got {low}")
    if step is not None and (not isinstance(step, (int, float)) or step <= 0 or log):
        raise SpaceError(f"step: expected a positive number (and no log scale), got {step!r}")
    grid = spec.get("grid")
    if grid is not None:
        if not isinstance(grid, list) or not grid:
            raise SpaceError("grid: give a non-empty list of values")
        grid = [_maybe_float(g) for g in grid]
        outside = [g for g in grid if not (isinstance(g, (int, float)) and low <= g <= high)]
        if outside:
            raise SpaceError(f"grid: {outside} outside [{low}, {high}]")
    elif kind == "int" and (high - low) / (step or 1) < MAX_INT_GRID:
        grid = list(range(int(low), int(high) + 1, int(step or 1)))
    return Param(name, kind, low=float(low) if kind == "float" else int(low),
                 high=float(high) if kind == "float" else int(high), log=log, step=step,
                 when=when, grid=tuple(grid) if grid is not None else None, line=line)


def _numeric_kind(annotation: str) -> str:
    has_int, has_float = "int" in annotation, "float" in annotation
    if has_int and has_float:
        raise SpaceError("the field takes an int or a float: say which with type: int or type: float")
    if has_int or has_float:
        return "int" if has_int else "float"
    raise SpaceError(f"the field is not a number ({annotation}): give its values as choices: [...]")


def _when(raw: Any) -> dict[str, tuple[Any, ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise SpaceError("when: expected a mapping such as {method.name: [lora, dora]}")
    return {str(k): tuple(v) if isinstance(v, list) else (v,) for k, v in raw.items()}


def _maybe_float(v: Any) -> Any:
    """'1e-4' is a string to YAML 1.1 (PyYAML); as a number it is what the user meant."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _names(section: str) -> list[str]:
    model: Any = RunConfig
    for part in [s for s in section.split(".") if s]:
        f = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        model = f.annotation if f is not None else None
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _order(params: list[Param]) -> tuple[list[Param], list[str] | None]:
    """Parameters with each condition's parameter before those that depend on it; a cycle if any."""
    by_name = {p.name: p for p in params}
    out: list[Param] = []
    state: dict[str, int] = {}

    def visit(p: Param, path: list[str]) -> list[str] | None:
        if state.get(p.name) == 2:
            return None
        if state.get(p.name) == 1:
            return path[path.index(p.name):] + [p.name]
        state[p.name] = 1
        for dep in p.when:
            if dep in by_name and dep != p.name:
                cycle = visit(by_name[dep], path + [p.name])
                if cycle:
                    return cycle
        state[p.name] = 2
        out.append(p)
        return None

    for p in params:
        cycle = visit(p, [])
        if cycle:
            return out, cycle
    return out, None


# ---------------------------------------------------------------- built-in spaces
_DEFAULTS = Path(__file__).with_name("default_spaces.yaml")


def default_space(method: str) -> Space:
    """The built-in space for a method (tunesmith/search/default_spaces.yaml says why each range)."""
    tree = yaml.safe_load(_DEFAULTS.read_text())
    if method not in tree:
        raise SpaceError(f"no built-in search space for method {method}; give --space SPACE.yaml")
    return parse_space(tree[method], f"the default space for method {method}")
