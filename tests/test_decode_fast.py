"""MolaLinear's no-grad fast branch (``_decode``) equals the general path and is taken only
when it applies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mola.core.layer import MolaLinear


def _layer(router: str = "topk", **kw: object) -> MolaLinear:
    torch.manual_seed(0)
    layer = MolaLinear(nn.Linear(16, 24), 4, r=4, top_k=2, router=router, **kw).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize("n", [1, 8])
def test_fast_branch_equals_general_path(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer()
    x = torch.randn(n, 1, 16)
    calls = []
    orig = MolaLinear._decode
    monkeypatch.setattr(MolaLinear, "_decode", lambda s, r, x: calls.append(1) or orig(s, r, x))
    with torch.no_grad():
        fast = layer(x)
    assert calls == [1]
    with torch.no_grad():
        layer.store = type("S", (), {"enabled": True, "add": lambda *a: None})()
        general = layer(x)  # a store is recording: the general path
    assert calls == [1]
    torch.testing.assert_close(fast, general, rtol=0, atol=1e-6)
    layer.store = None
    with torch.no_grad():  # weights change: the cache is rebuilt on the fast branch too
        layer.lora_A.add_(1.0)
        layer.router.weight.mul_(-1.0)
        fast2 = layer(x)
    layer.store = type("S", (), {"enabled": True, "add": lambda *a: None})()
    with torch.no_grad():
        torch.testing.assert_close(fast2, layer(x), rtol=0, atol=1e-6)
    assert not torch.allclose(fast, fast2)


def test_fast_branch_not_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(MolaLinear, "_decode", lambda *a: calls.append(1))
    x = torch.randn(2, 16)
    layer = _layer()
    layer(x)  # gradients on
    _layer(router="soft")(x.detach()).sum()
    with torch.no_grad():
        _layer(router="soft")(x)
        layer.train()(x)
    assert calls == []
