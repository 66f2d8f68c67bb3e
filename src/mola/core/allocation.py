"""Layer-wise allocation: turn a spec like ``"inverted-triangle"`` into one value per layer.

A *layer spec* says how many experts (or which top-k, or which rank) each decoder layer gets:

* an ``int``: the same value in every layer;
* a list with one value per decoder layer;
* a shorter list of ``G`` values: the layers are split into ``G`` contiguous groups as evenly as
  possible, the first ``num_layers % G`` groups taking one extra layer (like
  ``numpy.array_split``);
* a string of such numbers, ``"2,4,6,8"``;
* a named shape from the MoLA paper (:data:`SHAPES`), each a 4-group list.

>>> allocate("inverted-triangle", 6)
[2, 2, 4, 4, 6, 8]
"""

from __future__ import annotations

from collections.abc import Sequence

LayerSpec = int | str | Sequence[int]

SHAPES: dict[str, list[int]] = {
    "square": [5, 5, 5, 5],
    "triangle": [8, 6, 4, 2],
    "inverted-triangle": [2, 4, 6, 8],
    "hourglass": [8, 2, 2, 8],
}


def _parse(spec: LayerSpec, field: str) -> list[int]:
    if isinstance(spec, bool):
        raise ValueError(f"{field}: expected an int, a list of ints or a shape name, got {spec!r}")
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, str):
        name = spec.strip().lower().replace("_", "-")
        if name in SHAPES:
            return list(SHAPES[name])
        items = spec.replace(" ", "").split(",")
        if "" in items and spec.strip():
            raise ValueError(f"{field}: empty item in {spec!r}; give numbers like '2,4,6,8'")
        try:
            values = [int(v) for v in items]
        except ValueError:
            values = []
        return values or _bad(spec, field)
    try:
        values = list(spec)
    except TypeError:
        _bad(spec, field)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        _bad(spec, field)
    return values


def _bad(spec: object, field: str) -> list[int]:
    shapes = ", ".join(SHAPES)
    raise ValueError(
        f"{field}: cannot read {spec!r}; use an int, a list like '2,4,6,8' or a shape ({shapes})"
    )


def check_spec(spec: LayerSpec, field: str) -> list[int]:
    """The values of a layer spec, checked without a model: readable and each >= 1.

    Raises:
        ValueError: the spec cannot be read, has an empty item, or holds a value below 1.
    """
    values = _parse(spec, field)
    if any(v < 1 for v in values):
        raise ValueError(f"{field}: every value must be >= 1, got {values}")
    return values


def allocate(spec: LayerSpec, num_layers: int, *, field: str = "num_experts") -> list[int]:
    """Resolve a layer spec into one positive int per decoder layer.

    Args:
        spec: an int, a list, a comma-separated string or a shape name (see module docstring).
        num_layers: the number of decoder layers of the model.
        field: the config field being resolved, used in error messages.

    Returns:
        A list of ``num_layers`` ints.

    Raises:
        ValueError: the spec cannot be read, has a bad length, or holds a value below 1.
    """
    if num_layers < 1:
        raise ValueError(f"{field}: the model has no decoder layers ({num_layers})")
    values = check_spec(spec, field)
    return split_groups(values, num_layers, field)


def split_groups(values: list, num_layers: int, field: str) -> list:
    """Spread ``G`` group values over ``num_layers`` layers (contiguous, the first ones longer).

    Raises:
        ValueError: more values than layers.
    """
    groups = len(values)
    if groups == num_layers:
        return list(values)
    if groups > num_layers:
        raise ValueError(
            f"{field}: got {groups} values for {num_layers} decoder layers; give {num_layers} "
            f"values (one per layer) or at most {num_layers} group values"
        )
    size, extra = divmod(num_layers, groups)
    out: list = []
    for g, v in enumerate(values):
        out.extend([v] * (size + (1 if g < extra else 0)))
    return out
