"""Sweep files: a base ``mola train`` config, a grid, optional named variants, an output dir.

::

    base: {task: siqa, max_steps: 120}          # any `mola train` keys
    grid: {experts: [square, inverted-triangle], seed: [1, 2, 3]}
    variants:                                    # each crossed with the grid keys it does not set
      - {name: lora-r8, experts: 1, top_k: 1}
    output: runs/sweeps/allocation

Runs come out in a fixed order: the grid's product with its first key outermost (slowest), and at
each grid point the grid's own arm, then the variants in their listed order (a variant that sets a
grid key is crossed only with the other keys, so it runs once per value of those). Without
variants every grid point is a run. With variants, the grid's own points are arms only when some
variant sets one of the grid's keys (as ``experts`` above); otherwise the variants are the arms
and the grid only crosses them (e.g. ``grid: {task: [siqa, quartz], seed: [1, 2, 3]}``).
``grid_arms: true|false`` at the top level says it explicitly (e.g. ``false`` when a variant sets
``task`` only to pin a task-specific file).

A string value may name other options of its run in braces, filled in per run: e.g. a variant
``{name: guilomo, allocation: "allocations/guilomo_{task}.yaml"}`` crossed with
``grid: {task: [siqa, quartz]}`` trains each task with its own ``mola allocate`` file. ``{{`` and
``}}`` are literal braces; a name that is not a ``mola train`` option is an error.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from dataclasses import dataclass, fields
from typing import Any

import yaml

from mola.training.options import TrainOptions

SEED_KEY = "seed"
VARIANT_KEY = "variant"
TOP_LEVEL = ("base", "grid", "variants", "output", "keep_checkpoints", "grid_arms")
NOT_SWEEPABLE = ("output", "resume")
"""Options the sweep sets itself for every run."""

RUN_DEFAULTS: dict[str, Any] = {"progress": False}
"""Options a sweep run gets unless the sweep file sets them (no progress bars per run)."""


@dataclass
class Run:
    """One training run of a sweep.

    Attributes:
        name: its directory name under the sweep's output dir.
        labels: what identifies it, in order: ``variant`` (when it is a variant), then every grid
            key with the run's value of it (``seed`` included).
        options: the resolved ``mola train`` options (``output`` = its directory).
    """

    name: str
    labels: dict[str, str]
    options: dict[str, Any]

    @property
    def output(self) -> str:
        return str(self.options["output"])

    @property
    def group(self) -> tuple[tuple[str, str], ...]:
        """The labels without the seed: runs that differ only by seed share a group."""
        return tuple((k, v) for k, v in self.labels.items() if k != SEED_KEY)

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.labels.items())


@dataclass
class SweepSpec:
    """A parsed sweep file."""

    path: str
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    variants: list[tuple[str, dict[str, Any]]]
    output: str
    keep_checkpoints: bool = False
    grid_arms: bool | None = None  # None: inferred (see the module docstring)

    def runs(self) -> list[Run]:
        """Every run of the sweep, in the order they are trained (see the module docstring)."""
        keys = list(self.grid)
        grid_arms = self.grid_arms
        if grid_arms is None:
            grid_arms = not self.variants or any(set(v) & set(keys) for _, v in self.variants)
        runs: list[Run] = []
        seen: set[str] = set()
        for point in itertools.product(*(self.grid[k] for k in keys)):
            values = dict(zip(keys, point, strict=True))
            if grid_arms:
                self._add(runs, seen, None, values, {})
            for name, overrides in self.variants:
                crossed = {k: v for k, v in values.items() if k not in overrides}
                self._add(runs, seen, name, crossed, overrides)
        return runs

    def _add(
        self,
        runs: list[Run],
        seen: set[str],
        variant: str | None,
        crossed: dict[str, Any],
        overrides: dict[str, Any],
    ) -> None:
        parts = ([_slug(variant)] if variant is not None else []) + [
            f"{_slug(k)}-{_slug(v)}" for k, v in crossed.items()
        ]
        name = _shorten("_".join(parts) or "run")
        if name in seen:
            return
        seen.add(name)
        options = {**RUN_DEFAULTS, **self.base, **crossed, **overrides}
        options["output"] = os.path.join(self.output, name)
        try:
            options = _fill_placeholders(options)
        except ValueError as err:
            raise ValueError(f"sweep file {self.path}: run {name}: {err}") from None
        labels = {VARIANT_KEY: variant} if variant is not None else {}
        for key in self.grid:  # the run's value of every grid key, set by the grid or variant
            labels[key] = _text(options[key])
        try:
            TrainOptions(**options)
        except ValueError as err:
            raise ValueError(f"sweep file {self.path}: run {name}: {err}") from None
        runs.append(Run(name, labels, options))


_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


def _fill_placeholders(options: dict[str, Any]) -> dict[str, Any]:
    """Each string value with ``{option}`` replaced by the run's value of that option."""
    known = {f.name for f in fields(TrainOptions)}

    def fill(key: str, text: str) -> str:
        def one(match: re.Match[str]) -> str:
            token = match.group(0)
            if token in ("{{", "}}"):
                return token[0]
            ref = match.group(1).strip().replace("-", "_")
            if ref not in known:
                raise ValueError(f"{key}: {token} names no mola train option")
            if ref == key:
                raise ValueError(f"{key}: {token} refers to itself")
            value = options.get(ref)
            if value is None:
                raise ValueError(f"{key}: {token} is not set for this run")
            if isinstance(value, str) and "{" in value:
                raise ValueError(f"{key}: {token} refers to another placeholder")
            return _text(value)

        return _PLACEHOLDER.sub(one, text)

    return {
        k: fill(k, v) if k != "output" and isinstance(v, str) and ("{" in v or "}" in v) else v
        for k, v in options.items()
    }


def load_spec(path: str) -> SweepSpec:
    """Read and check a sweep file.

    Raises:
        ValueError: unreadable YAML, an unknown top-level key or option, a grid value that is not
            a non-empty list, a variant without a unique ``name``, or options that
            ``mola train`` would reject.
    """
    if not os.path.isfile(path):
        raise ValueError(f"sweep file {path} not found")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError:
        raise ValueError(f"sweep file {path}: invalid YAML") from None
    if not isinstance(data, dict):
        raise ValueError(f"sweep file {path}: expected a mapping with base, grid, variants, output")
    unknown = [k for k in data if k not in TOP_LEVEL]
    if unknown:
        raise ValueError(
            f"sweep file {path}: unknown key {unknown[0]!r}; expected {', '.join(TOP_LEVEL)}"
        )
    where = f"sweep file {path}"
    base = _options(data.get("base") or {}, f"{where}: base")
    grid_raw = data.get("grid") or {}
    if not isinstance(grid_raw, dict):
        raise ValueError(f"{where}: grid must be a mapping of option: [values]")
    grid: dict[str, list[Any]] = {}
    for key, values in grid_raw.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ValueError(f"{where}: grid: {key} has no values")
        coerced = [_options({key: v}, f"{where}: grid") for v in values]
        grid[next(iter(coerced[0]))] = [next(iter(c.values())) for c in coerced]
    variants: list[tuple[str, dict[str, Any]]] = []
    for i, item in enumerate(data.get("variants") or []):
        if not isinstance(item, dict) or not str(item.get("name") or "").strip():
            raise ValueError(f"{where}: variants[{i}] must be a mapping with a 'name'")
        name = str(item["name"]).strip()
        if name in [n for n, _ in variants]:
            raise ValueError(f"{where}: two variants are named {name!r}")
        rest = {k: v for k, v in item.items() if k != "name"}
        variants.append((name, _options(rest, f"{where}: variant {name}")))
    stem = os.path.splitext(os.path.basename(path))[0]
    output = str(data.get("output") or os.path.join("runs", "sweeps", stem))
    keep = data.get("keep_checkpoints", False)
    if not isinstance(keep, bool):
        raise ValueError(f"{where}: keep_checkpoints must be true or false")
    grid_arms = data.get("grid_arms")
    if grid_arms is not None and not isinstance(grid_arms, bool):
        raise ValueError(f"{where}: grid_arms must be true or false")
    spec = SweepSpec(path, base, grid, variants, output, keep, grid_arms)
    runs = spec.runs()  # checks every run's options
    if not runs:
        raise ValueError(f"{where}: no runs")
    return spec


def _options(raw: Any, where: str) -> dict[str, Any]:
    """``mola train`` options from a mapping: ``-`` or ``_`` keys, values cast to the field type."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping of option: value")
    known = {f.name: f for f in fields(TrainOptions)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(f"{where}: unknown option {key!r}")
        if name in NOT_SWEEPABLE:
            raise ValueError(f"{where}: {key!r} is set by the sweep for each run")
        out[name] = _cast(value, known[name], where)
    return out


def _cast(value: Any, f: Any, where: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if value is None or kind.startswith("str"):
        return _text(value) if value is not None else None
    ok = not isinstance(value, list | dict)
    if kind.startswith("bool"):
        ok = isinstance(value, bool)
    elif kind.startswith("int") or kind.startswith("float"):
        cast = int if kind.startswith("int") else float
        try:
            ok = ok and not isinstance(value, bool) and float(value) == cast(value)
            value = cast(value)
        except (TypeError, ValueError):
            ok = False
    if not ok:
        raise ValueError(f"{where}: {f.name}: expected {kind.split(' ')[0]}, got {value!r}")
    return value


def _text(value: Any) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)


def _slug(value: Any) -> str:
    """A value as a directory-name part: ``2,4,6,8`` -> ``2-4-6-8``, ``5e-4`` stays."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", _text(value)).strip("-") or "x"


def _shorten(name: str, limit: int = 80) -> str:
    if len(name) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9]}-{digest}"
