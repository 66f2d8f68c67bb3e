"""The layer's no-grad path reuses derived weights, and never a stale one."""

from __future__ import annotations

import torch
from torch import nn

from mola.core.cache import DerivedWeights
from mola.core.layer import MolaLinear


def layer(seed=0, num_experts=4):
    torch.manual_seed(seed)
    out = MolaLinear(nn.Linear(24, 20), num_experts, r=4, top_k=2).eval()
    with torch.no_grad():
        out.lora_B.normal_()
    return out


def reference(m, x):
    """The output with gradients on: built from the parameters, no cache involved."""
    with torch.enable_grad():
        return m(x).detach()


def test_no_grad_output_equals_graph_path_and_builds_once():
    m, x = layer(), torch.randn(3, 5, 24)
    with torch.no_grad():
        first = m(x)
    with torch.inference_mode():
        second = m(x)
    torch.testing.assert_close(first, reference(m, x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert m._fused_a.builds == 1 and m._b_rows.builds == 1


def test_optimizer_step_invalidates():
    m, x = layer(), torch.randn(7, 24)
    with torch.no_grad():
        m(x)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    with torch.enable_grad():
        m(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        after = m(x)
    torch.testing.assert_close(after, reference(m, x), rtol=1e-6, atol=1e-6)
    assert m._fused_a.builds == 2 and m._b_rows.builds == 2


def test_load_state_dict_replaced_parameter_and_train_invalidate():
    m, other, x = layer(0), layer(1), torch.randn(6, 24)
    with torch.inference_mode():
        m(x)
    m.load_state_dict(other.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(m(x), reference(other, x), rtol=1e-6, atol=1e-6)
    m.lora_B = nn.Parameter(torch.randn_like(m.lora_B))  # a new tensor, same version count
    with torch.no_grad():
        torch.testing.assert_close(m(x), reference(m, x), rtol=1e-6, atol=1e-6)
    m.train()
    assert m._fused_a._value is None and m._b_rows._value is None
    m.eval()
    with torch.no_grad():
        m(x)
    with torch.no_grad():
        m.router.weight.add_(1.0)  # in place: the version counter moves
        torch.testing.assert_close(m(x), reference(m, x), rtol=1e-6, atol=1e-6)


def test_grad_enabled_never_caches():
    cache, w = DerivedWeights(), torch.randn(3, 3, requires_grad=True)
    out = cache.get((w,), lambda: w * 2)
    assert out.requires_grad and cache.builds == 0
    with torch.no_grad():
        assert cache.get((w,), lambda: w * 2) is cache.get((w,), lambda: w * 3)
    assert cache.builds == 1
