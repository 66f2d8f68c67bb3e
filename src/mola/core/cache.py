"""Tensors derived from parameters, built once and rebuilt only when a parameter changes.

The layer's inference path needs the same derived weights at every call (the fused
``[router; A]`` matrix, ``B`` laid out for one matmul with the LoRA scale folded in). A
:class:`DerivedWeights` holds them with a key made of each source parameter's identity, storage
pointer and version counter. Every in-place change through autograd-visible ops bumps the version
(optimizer steps, ``load_state_dict``, ``nn.init``, ``param.copy_`` under ``no_grad``), replacing
a parameter or its ``.data`` changes the identity or the pointer, so a stale entry is never used.
Reading the key touches host-side metadata only: no device sync. Only writes through ``.data``
(``p.data.add_(...)``, which bypasses the version counter) go unseen; :meth:`clear` (called by
``train()``) drops the entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def weights_key(params: Sequence[Tensor]) -> tuple:
    """Identity, storage pointer, version, dtype and device of each tensor."""
    return tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in params)


def module_tensors(module: nn.Module) -> tuple[Tensor, ...]:
    """``module``'s parameters and buffers, its own first, then its children's.

    What ``(*module.parameters(), *module.buffers())`` gives for a small module, without the
    generators and the de-duplication: this is read at every call on the hot path.
    """
    out = [t for t in module._parameters.values() if t is not None]
    out.extend(t for t in module._buffers.values() if t is not None)
    for child in module._modules.values():
        if child is not None:
            out.extend(module_tensors(child))
    return tuple(out)


def cache_allowed() -> bool:
    """Whether derived weights may be reused: gradients are off (``no_grad``, ``inference_mode``).

    With gradients on, the derivation must be part of the graph (training), and a value built
    under ``inference_mode`` could not be saved for a backward pass.
    """
    if torch.compiler.is_compiling():
        return False  # let the compiler trace the derivation (no Python-side state in graphs)
    return not torch.is_grad_enabled()


class DerivedWeights:
    """One cached value built from some parameters; see the module docstring."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: Any = None
        self.builds = 0  # how often the value was (re)built, for tests

    def get(self, params: Sequence[Tensor], build: Callable[[], Any]) -> Any:
        """The cached value for ``params``, rebuilt (without recording a graph) when stale.

        When caching is not allowed (gradients are on), ``build()`` is
        returned directly and nothing is kept.
        """
        if not cache_allowed():
            return build()
        key = weights_key(params)
        if key != self._key:
            with torch.no_grad():
                self._value = build()
            self._key = key
            self.builds += 1
        return self._value

    def clear(self) -> None:
        self._key, self._value = None, None
