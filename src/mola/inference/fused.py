"""Input groups: adapted modules that read the same tensor run as one at inference.

In a Llama block ``q_proj``, ``k_proj`` and ``v_proj`` read the same normalised hidden state,
and so do ``gate_proj`` and ``up_proj``. At inference each of them would run its own base
matmul, its own ``[router; A]`` matmul, its own gate and its own ``B`` matmul: at one token per
step that is launch and Python overhead, not arithmetic. A group runs them once for all members:

* one matmul of ``x`` against the stacked frozen ``[W_1; ...; W_M]`` gives every member's base
  output (the members' weights become views of that stacked tensor: no copy), and one against
  the stacked ``[R_1; ...; R_M; A_1; ...; A_M]`` every router's rows and down-projection ``h``;
* the gates: one fused top-k when every member has a ``topk`` router with the same ``E`` and
  ``k``, else each member's own :meth:`~mola.routing.Router.gate` on its rows;
* one in-place ``addmm`` of the gated columns against the block-diagonal
  ``[scaling_m * W_up_m]`` adds every member's update to the base outputs (the block-diagonal
  copy of ``B`` is the group's only extra memory: ``sum(d_out) x sum(E r)``, mostly zeros).

The first member called computes every member's output and keeps the others' until they are
called with the same tensor (the same object, unchanged). The group is found from the model's
dataflow, not from module names: a probe forward records which adapted modules receive the
identical input tensor (:func:`find_input_groups`).

The grouped path is taken only where it is exact: gradients off (``no_grad``,
``inference_mode``), modules in eval mode, nothing being recorded for analysis, plain
``nn.Linear`` bases of one dtype and device, and every member's router reading ``x`` itself
(no block-shared router, no SMoRA selection bias; the CoMoL core structure routes on ``A x``
and FlyLoRA has no learned router). Anything else falls back to each module's own forward, so
training and analysis are untouched. Outputs equal the per-module path to float rounding
(tested on every supported family, router and structure).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mola.core.cache import DerivedWeights, cache_allowed, module_tensors
from mola.core.layer import MolaLinear
from mola.experts.fastpath import gate_columns
from mola.experts.stacked import StackedExperts
from mola.routing.base import topk_gates
from mola.routing.simple import TopKRouter


def _mola_layers(model: nn.Module) -> list[tuple[str, MolaLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MolaLinear)]


def find_input_groups(
    model: nn.Module, probe: dict[str, Tensor] | None = None
) -> list[list[tuple[str, MolaLinear]]]:
    """The adapted modules of ``model`` grouped by the input tensor they read.

    One no-grad probe forward (``probe``: the model's keyword inputs; by default two tokens of
    id 0) records, for every :class:`MolaLinear`, the tensor object it was called with. Modules
    called with the very same tensor in that forward form a group (in call order); a module
    that reads its own input is left out. The probe runs with the per-module path (any groups
    already installed are lifted for it).
    """
    layers = _mola_layers(model)
    saved = {id(m): m.input_group for _, m in layers}
    for _, m in layers:
        m.input_group = None
    seen: list[tuple[str, MolaLinear, Tensor]] = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: seen.append((name, mod, args[0])))
        for name, m in layers
    ]
    if probe is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        probe = {"input_ids": torch.zeros(1, 2, dtype=torch.long, device=device)}
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(**probe)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
        for _, m in layers:
            m.input_group = saved[id(m)]
    groups: dict[int, list[tuple[str, MolaLinear]]] = {}
    for name, module, x in seen:  # x is kept alive by `seen`, so ids are not reused
        members = groups.setdefault(id(x), [])
        if all(module is not m for _, m in members):
            members.append((name, module))
    return [members for members in groups.values() if len(members) > 1]


BLOCK_DIAGONAL_ROWS = 16
"""Up to this many tokens a group adds its updates with one block-diagonal ``addmm`` (decoding:
launches dominate); beyond it, one ``addmm`` per member on its own block (prefill and scoring:
the zero blocks would be arithmetic for nothing)."""


def _version(x: Tensor) -> int:
    """``x``'s version counter; inference tensors have none (identity alone then says it is the
    same input: nothing writes into a module's input between its readers' calls)."""
    return -2 if x.is_inference() else x._version


def _plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear


def _groupable(m: MolaLinear) -> bool:
    """Whether the module's math is the one the group computes (checked at every call)."""
    experts = m.experts
    return (
        not m.disabled
        and m.shared is None
        and not experts.training
        and (m.store is None or not m.store.enabled)
        and _plain_linear(m.base_layer)
        and experts.learned_router
        and not experts.router_reads_h
        and not experts.biased_routing
    )


class InputGroup:
    """Adapted modules that read the same input, run as one at inference (module docstring).

    The members' frozen base weights (and biases) are moved once into one stacked tensor, and
    each ``base_layer.weight`` becomes a view of its rows: the same values, no second copy, and
    the modules stay what training and saving see. Where that cannot be done (a base that is not
    a plain ``nn.Linear``, bases of different dtypes or devices, a trainable base) the group
    never runs and every member takes its own path.
    """

    def __init__(self, members: Iterable[MolaLinear]) -> None:
        self.members = list(members)
        if len(self.members) < 2:
            raise ValueError("an input group needs at least two modules")
        d_in = {m.in_features for m in self.members}
        if len(d_in) != 1:
            raise ValueError(f"input group: members read different widths {sorted(d_in)}")
        self._had_bias = [m.base_layer.bias is not None for m in self.members]
        self.base_weight, self.base_bias = self._stack_bases()
        self.weights = DerivedWeights()
        self._x: Tensor | None = None
        self._version = -1
        self._pending: dict[int, Tensor] = {}
        self.calls = 0  # grouped computations, for tests

    def _stack_bases(self) -> tuple[Tensor | None, Tensor | None]:
        bases = [m.base_layer for m in self.members]
        weights = [b.weight for b in bases if _plain_linear(b)]
        if (
            len(weights) != len(bases)
            or len({(w.dtype, w.device) for w in weights}) != 1
            or any(w.requires_grad for w in weights)
        ):
            return None, None
        with torch.no_grad():
            weight = torch.cat([w.detach() for w in weights])
            bias = None
            if any(b.bias is not None for b in bases):
                bias = torch.cat(
                    [b.bias.detach() if b.bias is not None else w.new_zeros(w.shape[0])
                     for b, w in zip(bases, weights, strict=True)]
                )  # fmt: skip
        start = 0
        for b in bases:
            rows = b.weight.shape[0]
            b.weight = nn.Parameter(weight[start : start + rows], requires_grad=False)
            if b.bias is not None:
                b.bias = nn.Parameter(bias[start : start + rows], requires_grad=False)
            start += rows
        return weight, bias

    def _bases_in_place(self) -> bool:
        """Whether every member's base still reads its rows of the stacked weight and bias
        (a member stacked without a bias must still have none: its rows of the bias are 0)."""
        if self.base_weight is None:
            return False
        ptr, row = self.base_weight.data_ptr(), self.base_weight.stride(0)
        start = 0
        for m, had_bias in zip(self.members, self._had_bias, strict=True):
            w, b = m.base_layer.weight, m.base_layer.bias
            if w.data_ptr() != ptr + start * row * w.element_size():
                return False
            if (b is not None) != had_bias:
                return False
            if (
                b is not None
                and b.data_ptr() != self.base_bias.data_ptr() + start * b.element_size()
            ):
                return False
            start += w.shape[0]
        return True

    def output(self, member: MolaLinear, x: Tensor) -> Tensor | None:
        """``member``'s output for ``x``, or ``None`` where the group cannot give it exactly."""
        if not cache_allowed():  # gradients on, or inside torch.compile: the per-module path
            return None
        if x is self._x and _version(x) == self._version:
            out = self._pending.pop(id(member), None)
            if not self._pending:
                self._x = None
            if out is not None:
                return out
        if not all(_groupable(m) for m in self.members) or not self._bases_in_place():
            return None
        outputs = self._compute(x)
        self.calls += 1
        mine = outputs.pop(id(member))
        if outputs:  # the other members' outputs wait for their calls with this same x
            self._x, self._version, self._pending = x, _version(x), outputs
        else:
            self._x, self._pending = None, {}
        return mine

    # -- the derived adapter weights ----------------------------------------------------------
    def _sources(self) -> tuple[Tensor, ...]:
        out: list[Tensor] = []
        for m in self.members:
            out.extend(module_tensors(m.experts))
            if m.router is not None:
                out.extend(m.router.fused_sources())
        return tuple(out)

    def _build(self) -> dict[str, Any]:
        members = self.members
        routers = [m.router.fused_weight() if m.router is not None else None for m in members]
        down = torch.cat(
            [w for w in routers if w is not None] + [m.experts.down_weight() for m in members]
        )
        up = torch.block_diag(*[m.experts.scaled_up_weight() for m in members]).t().contiguous()
        # one top-k for all: stacked experts of one count, rank and k under `topk` routers
        shape = {
            (m.num_experts, m.r, m.router.top_k or 1)
            if type(m.router) is TopKRouter and type(m.experts) is StackedExperts
            else None
            for m in members
        }
        return {
            "down": down,
            "up": up,
            "outs": [m.out_features for m in members],
            "rows": [0 if w is None else w.shape[0] for w in routers],
            "cols": [m.experts.down_weight().shape[0] for m in members],
            "widths": [m.experts.up_weight().shape[1] for m in members],
            "fused_topk": shape.pop() if len(shape) == 1 and None not in shape else None,
        }

    # -- the computation ----------------------------------------------------------------------
    def _compute(self, x: Tensor) -> dict[int, Tensor]:
        members = self.members
        w = self.weights.get(self._sources(), self._build)
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        out = F.linear(flat, self.base_weight, self.base_bias)  # as each base_layer(x) would
        adapter_dtype = w["down"].dtype  # fp32 adapters on a bf16/fp16 base: cast in, cast out
        if flat.dtype != adapter_dtype:
            flat = flat.to(adapter_dtype)
        both = F.linear(flat, w["down"])
        rows = sum(w["rows"])
        routed, h = both[:, :rows], both[:, rows:]
        n = flat.shape[0]
        if w["fused_topk"] is not None:
            e, r, k = w["fused_topk"]
            gates, _ = topk_gates(routed.reshape(n * len(members), e), k)  # rows: tokens x members
            gates = gates.to(h.dtype) if gates.dtype != h.dtype else gates
            z = (h.reshape(n, len(members), e, r) * gates.view(n, len(members), e, 1)).view(n, -1)
        else:
            parts, r0, c0 = [], 0, 0
            for m, rows_m, cols in zip(members, w["rows"], w["cols"], strict=True):
                h_m = h[:, c0 : c0 + cols]
                if m.router is None:  # one expert: a plain LoRA, gate 1
                    z_m = h_m
                else:
                    gates = m.router.gate(routed[:, r0 : r0 + rows_m], flat).gates
                    z_m = gate_columns(h_m, gates, m.experts.block)
                parts.append(m.experts.combine(z_m))
                r0, c0 = r0 + rows_m, c0 + cols
            z = torch.cat(parts, dim=1)
        up = w["up"]
        if out.dtype != z.dtype or up.dtype != z.dtype:
            out += torch.mm(z, up).to(out.dtype)
        elif n <= BLOCK_DIAGONAL_ROWS:  # few tokens (decoding): one kernel beats less arithmetic
            out.addmm_(z, up)
        else:  # many tokens: each member's own block, none of the zeros (views, no copies)
            c0 = o0 = 0
            for width, d_out in zip(w["widths"], w["outs"], strict=True):
                out[:, o0 : o0 + d_out].addmm_(
                    z[:, c0 : c0 + width], up[c0 : c0 + width, o0 : o0 + d_out]
                )
                c0, o0 = c0 + width, o0 + d_out
        outputs, start = {}, 0
        for m, d_out in zip(members, w["outs"], strict=True):
            outputs[id(m)] = out[:, start : start + d_out].view(*lead, d_out)
            start += d_out
        return outputs


def group_inputs(model: nn.Module, probe: dict[str, Tensor] | None = None) -> list[list[str]]:
    """Find the input groups of ``model`` and run each as one at inference; returns the groups'
    module names. Calling it again regroups; :func:`ungroup_inputs` undoes it."""
    ungroup_inputs(model)
    names = []
    for members in find_input_groups(model, probe):
        group = InputGroup(m for _, m in members)
        for _, m in members:
            m.input_group = group
        names.append([name for name, _ in members])
    return names


def ungroup_inputs(model: nn.Module) -> None:
    """Every adapted module runs on its own again, with base weights of its own (not views of a
    group's stacked tensor, which ``save_pretrained`` would refuse as shared memory)."""
    for _, m in _mola_layers(model):
        group, m.input_group = m.input_group, None
        if group is not None and group.base_weight is not None:
            base = m.base_layer
            with torch.no_grad():
                base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
                if base.bias is not None:
                    base.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)


GROUP_HELP = (
    "run adapted modules that read the same input as one (q/k/v, gate/up: one matmul each for "
    "the group; exact); not with --compile. On a 2-core CPU it did not reliably pay off "
    "(docs/inference.md)"
)


def add_group_argument(parser: Any) -> None:
    """``--group-inputs`` (see :data:`GROUP_HELP`)."""
    parser.add_argument("--group-inputs", action="store_true", help=GROUP_HELP)


def group_for_cli(model: nn.Module, args: Any) -> None:
    """Group the model's inputs when ``--group-inputs`` was given (not with ``--compile``)."""
    if not getattr(args, "group_inputs", False) or getattr(args, "compile", None):
        return
    if any(True for _ in _mola_layers(model)):
        group_inputs(model)
