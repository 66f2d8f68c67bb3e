"""``MolaModel``: a Hugging Face causal LM whose targeted layers carry routed LoRA experts."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.utils import ModelOutput

from mola import __version__
from mola.core.aux_losses import reduce_router_losses
from mola.core.checkpoint import (
    adapter_state_dict,
    is_adapter_name,
    load_adapter_weights,
    read_adapter_config,
    save_adapter,
)
from mola.core.collect import RouterLogitsStore
from mola.core.config import MolaConfig
from mola.core.injection import find_decoder_layers, inject
from mola.core.layer import MolaLinear
from mola.routing import Router
from mola.routing.adaptive_l1 import AdaptiveL1
from mola.routing.sparsegen import authors_hidden
from mola.utils.distributed import is_distributed


class MolaModel(nn.Module):
    """A base model with MoLA layers injected; forwards like the base model.

    With ``labels``, ``output.loss`` is the LM loss plus each auxiliary router loss times its
    config weight ``<name>_coef``: ``aux_loss_coef * aux_loss + router_z_loss_coef *
    router_z_loss`` and the router's own losses (:attr:`loss_names`). The output also carries
    ``lm_loss`` and every unweighted auxiliary loss, aggregated over modules and layers by
    ``aux_loss_reduction``, under its name (``aux_loss`` is the load-balancing loss).

    Build one with :func:`get_mola_model` or :meth:`from_pretrained`.
    """

    def __init__(self, model: nn.Module, config: MolaConfig) -> None:
        super().__init__()
        self.base_model = model
        config = _resolve_defaults(model, config)
        self.mola_config = config
        self.router_store = RouterLogitsStore()
        model.requires_grad_(False)
        self.allocation = inject(model, config, self.router_store)
        for name, param in model.named_parameters():
            param.requires_grad_(is_adapter_name(name))
        self.logits_only_where_labelled = False
        self._head_takes_positions = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._layer_routers = self._routers_by_layer()
        routings = [layer.routing for _, layer in self.mola_layers()]
        self._all_routers = list({id(r): r for r in routings if r is not None}.values())
        self.l1_schedule = self._adaptive_l1()
        # trainable adapters are attached: the Trainer then trains on a quantized base
        self._hf_peft_config_loaded = True

    # -- delegation -------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def config(self) -> Any:
        """The base model's config."""
        return self.base_model.config

    def _routers_by_layer(self) -> dict[int, Router]:
        """The router of each decoder layer (its first routed module's), computing its losses."""
        routers: dict[int, Router] = {}
        for _, layer in self.mola_layers():
            if layer.routing is not None:
                idx = -1 if layer.layer_idx is None else layer.layer_idx
                routers.setdefault(idx, layer.routing)
        return routers

    def _adaptive_l1(self) -> AdaptiveL1 | None:
        """ReMoE's adaptive L1 weight, for models with ReLU routers that have a target ``k``.

        The Trainer calls its ``step()`` after every optimizer step; ``loss_coef('l1_loss')``
        is its current value (``l1_loss_coef`` is the start, ``l1_loss_alpha`` the multiplier).
        """
        relu = [
            layer.routing
            for _, layer in self.mola_layers()
            if layer.routing is not None and layer.routing.name == "relu"
        ]
        if not relu or all(r.top_k is None for r in relu):
            return None
        cfg = self.mola_config
        return AdaptiveL1(cfg.l1_loss_coef, cfg.l1_loss_alpha)

    def loss_coef(self, name: str) -> float:
        """The weight of auxiliary loss ``name`` now (the config's, or the adaptive L1 one)."""
        if name == "l1_loss" and self.l1_schedule is not None:
            return self.l1_schedule.coef
        return self.mola_config.loss_coef(name)

    def _layer_groups(self, idx: int) -> list[tuple[tuple, Router, list]]:
        """The routing records of decoder layer ``idx`` grouped by router kind and size: modules
        with other settings (``module_patterns``) get their own balance loss per group. A
        block's shared routing counts once (one router, as in MixLoRA)."""
        groups: dict[tuple, tuple[Router, list]] = {}
        seen: set[int] = set()
        for name, record in self.router_store.records.get(idx, []):
            if id(record) in seen:  # a block's shared routing, recorded by each of its modules
                continue
            seen.add(id(record))
            try:
                router = self.base_model.get_submodule(name).routing
            except AttributeError:  # a record not named after a module
                router = None
            router = router or self._layer_routers[idx]
            key = (router.name, router.num_experts, router.top_k, router.top_p)
            groups.setdefault(key, (router, []))[1].append(record)
        return [(key, router, records) for key, (router, records) in groups.items()]

    @property
    def loss_names(self) -> list[str]:
        """Names of the auxiliary losses this model reports (``aux_loss``, ``router_z_loss``,
        then the router's own), each a key of the output and weighted by ``<name>_coef``."""
        names = ["aux_loss", "router_z_loss"]
        for router in self._all_routers:  # every module's: module_patterns may mix routers
            names += [n for n in router.loss_names if n not in names]
        return names

    def mola_layers(self) -> Iterator[tuple[str, MolaLinear]]:
        """``(qualified name, layer)`` for every adapted layer, in model order."""
        for name, module in self.base_model.named_modules():
            if isinstance(module, MolaLinear):
                yield name, module

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self, *args: Any, labels: Tensor | None = None, group: Tensor | None = None, **kwargs: Any
    ) -> Any:
        """The base model's forward; with ``labels`` also the router losses (see the class).

        ``group``: ``(B,)`` each example's type (``-1``: none), read by LoRAMoE's constraint.
        """
        store = self.router_store
        capturing = store.enabled
        if labels is not None and not capturing:
            store.clear()
            store.enabled = True
        try:
            if labels is not None and self._can_skip_unlabelled(args, kwargs):
                output = self._forward_labelled_positions(labels, kwargs)
            else:
                output = self.base_model(*args, labels=labels, **kwargs)
        finally:
            store.enabled = capturing
        if labels is not None:
            context: dict[str, Any] = {"batch_size": _batch_size(args, kwargs)}
            if group is not None:
                context["group"] = group
            losses = self.router_losses(kwargs.get("attention_mask"), context)
            if not capturing:
                store.clear()
            total = output.loss
            for name, value in losses.items():
                total = total + self.loss_coef(name) * value
            output = with_router_losses(output, lm_loss=output.loss, **losses)
            output["loss"] = total
        return output

    def _can_skip_unlabelled(self, args: tuple, kwargs: dict[str, Any]) -> bool:
        if not self.logits_only_where_labelled or args or "logits_to_keep" in kwargs:
            return False
        return self._head_takes_positions and "input_ids" in kwargs

    def _forward_labelled_positions(self, labels: Tensor, kwargs: dict[str, Any]) -> Any:
        """The LM loss with the output head applied only at positions that predict a label.

        Equal to the base model's own loss (mean token cross-entropy over labels != -100), but
        when the loss covers only the responses, most positions never reach the vocabulary-sized
        head. ``output.logits`` then holds just those positions.
        """
        targets = labels[:, 1:]
        keep = (targets != -100).any(dim=0).nonzero().squeeze(-1)
        output = self.base_model(**kwargs, logits_to_keep=keep)
        logits = output.logits.float()
        output["loss"] = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets[:, keep].reshape(-1), ignore_index=-100
        )
        return output

    #: In training mode under a ``torch.distributed`` group, take the router losses over the
    #: global batch (see :func:`mola.routing.load_balancing_loss`); set False for per-process.
    global_router_losses: bool = True

    def router_losses(
        self, attention_mask: Tensor | None = None, context: dict[str, Any] | None = None
    ) -> dict[str, Tensor]:
        """Unweighted auxiliary losses by name from the collected routing: ``aux_loss`` (load
        balancing), ``router_z_loss`` and the router's own, each aggregated over modules and
        layers by ``aux_loss_reduction`` (:mod:`mola.core.aux_losses`; MoLA: per decoder layer,
        summed over layers).

        In training mode with several processes (``torch.distributed``), every loss (load
        balancing, z-loss and the routers' own) is computed over the global batch: a few
        all-reduces per layer, so every process must run the same forward.
        """
        sync = self.global_router_losses and self.training and is_distributed()
        schedule = self.l1_schedule if self.training and torch.is_grad_enabled() else None
        layers = {idx: self._layer_groups(idx) for idx in self._layer_routers}
        if schedule is not None:
            for idx, groups in layers.items():
                for _, router, records in groups:
                    if router.name == "relu" and router.top_k is not None:
                        schedule.observe(
                            idx, records, router.num_experts, router.top_k, attention_mask
                        )
        return reduce_router_losses(
            layers,
            lambda router: self.mola_config.reduction(router.name),
            self.loss_names,
            self._device(),
            attention_mask=attention_mask,
            context=context,
            global_batch=sync,
            z_loss=self.mola_config.router_z_loss_coef > 0,
        )

    @contextmanager
    def capture_router_logits(self) -> Iterator[RouterLogitsStore]:
        """Keep every forward's router logits in the yielded store (for analysis)."""
        with self.router_store.collecting() as store:
            yield store

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the plain base model inside the block."""
        layers = [layer for _, layer in self.mola_layers()]
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, **kwargs: Any
    ) -> None:
        """Checkpoint the base model's layers, non-reentrant so router logits keep a graph."""
        ckpt = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        base = self.base_model
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt, **kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt, **kwargs)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any
    ) -> None:
        """Alias of :meth:`activation_checkpointing_enable` (the transformers 4.x name)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    # -- bookkeeping ------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    def num_parameters_split(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.num_parameters_split()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} "
            f"|| trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    # -- checkpoints ------------------------------------------------------------------------
    def adapter_config(self) -> dict[str, Any]:
        """What ``adapter_config.json`` holds: the config, the base model and the allocation."""
        base_config = getattr(self.base_model, "config", None)
        config = {
            **self.mola_config.to_dict(),
            "base_model_name_or_path": getattr(base_config, "_name_or_path", None),
            "base_model_class": type(self.base_model).__name__,
            "allocation": self.allocation,
            "mola_version": __version__,
        }
        revision = getattr(base_config, "mola_revision", None)
        if revision:  # a Hub id's branch, tag or commit (--revision)
            config["revision"] = revision
        return config

    def save_pretrained(self, save_directory: str | os.PathLike[str], **_: Any) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (adapter tensors only).

        Extra keyword arguments (as the HF ``Trainer`` passes) are ignored.
        """
        save_adapter(os.fspath(save_directory), self.adapter_config(), self.base_model)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return adapter_state_dict(self.base_model)

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module, adapter_dir: str | os.PathLike[str], is_trainable: bool = False
    ) -> MolaModel:
        """Rebuild a saved adapter on a fresh ``base_model``; outputs match the saved model's.

        Raises:
            ValueError: the directory is not an adapter, or it does not fit ``base_model``.
        """
        directory = os.fspath(adapter_dir)
        data = read_adapter_config(directory)
        saved_class = data.get("base_model_class")
        if saved_class and saved_class != type(base_model).__name__:
            raise ValueError(
                f"adapter {directory} was trained on a {saved_class}, "
                f"but the base model is a {type(base_model).__name__}"
            )
        config = MolaConfig.from_dict(data)
        allocation = data.get("allocation")
        if allocation:  # rebuild exactly the saved per-layer allocation
            config.num_experts, config.top_k, config.r = (
                allocation["num_experts"],
                allocation["top_k"],
                allocation["r"],
            )
            if any(v is None for v in config.top_k):
                config.top_k = None
        try:
            model = cls(base_model, config)
        except ValueError as err:
            raise ValueError(f"adapter {directory} does not fit the base model: {err}") from None
        load_adapter_weights(directory, model.base_model)
        model.mola_config = MolaConfig.from_dict(data)
        model.requires_grad_(False)
        if not is_trainable:  # like PEFT: a loaded adapter is for inference (no LoRA dropout)
            model.eval()
        if is_trainable:
            for name, param in model.named_parameters():
                param.requires_grad_(is_adapter_name(name))
        return model


def _resolve_defaults(model: nn.Module, config: MolaConfig) -> MolaConfig:
    """``config`` with the settings that depend on the base model filled in: LD-MoLE's lambda
    MLP width (``ldmole_hidden``) as the authors' configs set it for a model of this size."""
    routers = {config.router} | {str(v.get("router")) for v in config.module_patterns.values()}
    if config.ldmole_hidden is None and "ldmole" in routers:
        size = sum(p.numel() for p in model.parameters())
        config = dataclasses.replace(config, ldmole_hidden=authors_hidden(size))
    return config


def _batch_size(args: tuple, kwargs: dict[str, Any]) -> int:
    """The number of examples of a forward's input (1 if it cannot tell)."""
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]):
        if isinstance(value, Tensor) and value.dim() >= 2:
            return int(value.shape[0])
    return 1


@functools.cache
def _output_class(base: type, names: tuple[str, ...] = ()) -> type:
    """``base`` (a ``ModelOutput`` dataclass) plus the fields ``names`` (the router losses).

    A real dataclass, not keys set on the base output: DDP rebuilds the output from its pytree
    as ``type(output)(**fields)``, which fails on keys the class does not declare.
    """
    extra = [(name, Any, None) for name in names]
    cls = dataclasses.make_dataclass(f"Mola{base.__name__}", extra, bases=(base,))
    cls.__module__ = __name__
    return cls


def with_router_losses(output: Any, **losses: Tensor) -> Any:
    """``output`` as an instance of :func:`_output_class`, carrying ``losses`` too."""
    if not (isinstance(output, ModelOutput) and dataclasses.is_dataclass(output)):
        for key, value in losses.items():
            output[key] = value
        return output
    return _output_class(type(output), tuple(losses))(**dict(output.items()), **losses)


def get_mola_model(model: nn.Module, config: MolaConfig | None = None) -> MolaModel:
    """Freeze ``model`` and replace each targeted linear layer with a :class:`MolaLinear`.

    Each layer gets the experts, top-k and rank of its decoder layer (see :func:`mola.allocate`).
    The returned model starts out equal to the base model (every ``lora_B`` is zero).
    """
    return MolaModel(model, config or MolaConfig())


def module_keys(model: MolaModel) -> dict[str, str]:
    """Short, per-model unique keys of the adapted modules: qualified name -> key.

    The key is the module's last name component (``q_proj``) when that is unique within the
    decoder layers, else its path inside the decoder block (GPT-2's ``attn.c_proj`` and
    ``mlp.c_proj``).
    """
    try:
        prefix = find_decoder_layers(model.base_model)[0]
    except ValueError:
        prefix = None
    relative: dict[str, str] = {}
    for name, layer in model.mola_layers():
        head = f"{prefix}.{layer.layer_idx}." if prefix else f"{layer.layer_idx}."
        relative[name] = name[len(head) :] if name.startswith(head) else name
    last = {name: rel.rsplit(".", 1)[-1] for name, rel in relative.items()}
    clashes: dict[str, set[str]] = {}
    for name, short in last.items():
        clashes.setdefault(short, set()).add(relative[name])
    return {name: last[name] if len(clashes[last[name]]) == 1 else relative[name] for name in last}
