"""Layer specs: ints, lists, group lists, strings and the paper's named shapes."""

from __future__ import annotations

import pytest

from mola import SHAPES, MolaConfig, allocate


@pytest.mark.parametrize(
    "spec,layers,expected",
    [
        (3, 4, [3, 3, 3, 3]),
        ([1, 2, 3], 3, [1, 2, 3]),
        ([2, 4], 4, [2, 2, 4, 4]),
        ([2, 4], 5, [2, 2, 2, 4, 4]),
        ("2,4,6,8", 8, [2, 2, 4, 4, 6, 6, 8, 8]),
        ("2, 4", 3, [2, 2, 4]),
        ("7", 2, [7, 7]),
        ("square", 4, [5, 5, 5, 5]),
        ("triangle", 4, [8, 6, 4, 2]),
        ("inverted-triangle", 4, [2, 4, 6, 8]),
        ("inverted_triangle", 4, [2, 4, 6, 8]),
        ("hourglass", 8, [8, 8, 2, 2, 2, 2, 8, 8]),
        ([1, 2, 3, 4], 4, [1, 2, 3, 4]),
    ],
)
def test_allocate_table(spec, layers, expected):
    assert allocate(spec, layers) == expected


def test_inverted_triangle_on_30_layers():
    got = allocate("inverted-triangle", 30)
    assert [got.count(v) for v in (2, 4, 6, 8)] == [8, 8, 7, 7]
    assert got == sorted(got)


@pytest.mark.parametrize("name", list(SHAPES))
def test_paper_shapes_hold_160_experts_on_32_layers(name):
    assert sum(allocate(name, 32)) == 160


@pytest.mark.parametrize(
    "layers,groups", [(n, g) for n in range(1, 40) for g in (1, 2, 3, 4, 7) if g <= n]
)
def test_groups_split_like_array_split(layers, groups):
    got = allocate(list(range(1, groups + 1)), layers)
    sizes = [got.count(g) for g in range(1, groups + 1)]
    base, extra = divmod(layers, groups)
    assert sizes == [base + 1] * extra + [base] * (groups - extra)


@pytest.mark.parametrize(
    "spec,layers,message",
    [
        ([1, 2, 3], 2, "num_experts: got 3 values for 2 decoder layers"),
        ("inverted-triangle", 3, "num_experts: got 4 values for 3 decoder layers"),
        ([0, 2], 4, "num_experts: every value must be >= 1"),
        (-1, 4, "num_experts: every value must be >= 1"),
        ("pyramid", 4, "num_experts: cannot read 'pyramid'"),
        ("2,x", 4, "num_experts: cannot read"),
        ([], 4, "num_experts: cannot read"),
        ([1.5, 2], 4, "num_experts: cannot read"),
        (True, 4, "num_experts: expected an int"),
    ],
)
def test_bad_specs_name_the_field(spec, layers, message):
    with pytest.raises(ValueError, match=message) as err:
        allocate(spec, layers)
    assert "\n" not in str(err.value)


def test_config_resolve_and_top_k_check():
    with pytest.raises(ValueError, match=r"top_k: 3 is more than the 2 experts of a layer"):
        MolaConfig(num_experts=[2, 4], top_k=3)  # decidable without the model
    cfg = MolaConfig(num_experts=[2, 4], top_k=[3, 3, 3, 3])
    with pytest.raises(ValueError, match=r"decoder layer 0: top_k: 3 is not in 1..2"):
        cfg.resolve(4)
    # a layer with one expert is a plain LoRA: no router, top_k 1
    assert MolaConfig(num_experts=[1, 4], top_k=2).resolve(4)["top_k"] == [1, 1, 2, 2]
    cfg = MolaConfig(num_experts=[2, 4], top_k=[1, 3], r="4,8")
    assert cfg.resolve(4) == {"num_experts": [2, 2, 4, 4], "top_k": [1, 1, 3, 3], "r": [4, 4, 8, 8]}
    with pytest.raises(ValueError, match="^r: every value must be >= 1"):
        MolaConfig(num_experts=2, r=0).resolve(2)
    # switch and soft ignore top_k
    assert MolaConfig(num_experts=1, router="soft").resolve(1)["num_experts"] == [1]
