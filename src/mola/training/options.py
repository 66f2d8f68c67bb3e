"""Training options: one dataclass, readable from a YAML file and overridable by flags.

Every field is a ``--flag`` (``train_on_inputs`` -> ``--train-on-inputs``); a YAML file may use
either spelling. Precedence: built-in defaults < YAML file < command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import yaml

from mola.core.allocation import check_spec
from mola.core.checks import check_number, check_top_k
from mola.core.config import LLAMA_TARGETS, MolaConfig
from mola.data.columns import parse_columns
from mola.data.datasets import TASKS
from mola.data.prompts import TEMPLATES
from mola.experts import STRUCTURES
from mola.methods import METHODS
from mola.models.hub import DEFAULT_MODEL
from mola.models.placement import LoadOptions
from mola.models.precision import DTYPE_CHOICES, quant_bits
from mola.routing import REDUCTIONS, ROUTERS
from mola.routing.scope import SCOPES
from mola.training.trackers import parse_report_to


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainOptions:
    """Everything ``mola train`` reads; see ``mola train --help``."""

    EXPERTS_FROM_FLAGS: ClassVar[bool] = True
    """Whether ``--experts`` sets the expert counts (``mola allocate`` picks them itself)."""
    NO_FLAG: ClassVar[frozenset[str]] = frozenset()
    """Fields a command ignores: they get no ``--flag`` (a shared YAML file may still set them)."""

    # model and data
    model: str = _opt(DEFAULT_MODEL, "local HF model dir, built-in name or Hub id ORG/NAME")
    revision: str | None = _opt(None, "Hub branch, tag or commit of --model (default main)")
    dtype: str = _opt(
        "auto",
        "base weights dtype (auto: bf16 on a bf16 GPU, else fp32); adapters stay fp32",
        choices=DTYPE_CHOICES,
    )
    load_in_4bit: bool = _opt(False, "4-bit nf4 base, double quantization (bitsandbytes; QLoRA)")
    load_in_8bit: bool = _opt(False, "8-bit LLM.int8 base (bitsandbytes)")
    task: str = _opt(
        "sarcasm",
        "built-in task: sarcasm, siqa, quartz or logiqa; several joined by + train on their "
        "mixture and score each task on its own test split",
    )
    data: str | None = _opt(
        None,
        "training data: JSON/JSONL/CSV/Parquet file, save_to_disk dir or Hub id ORG/NAME; "
        "overrides --task",
    )
    eval_data: str | None = _opt(None, "evaluation data, as --data (default: the task's test)")
    data_split: str | None = _opt(None, "split of --data when it has several; None: train")
    eval_data_split: str | None = _opt(None, "split of --eval-data when it has several; None: test")
    data_config: str | None = _opt(None, "configuration name of a Hub dataset (load_dataset)")
    data_columns: str | None = _opt(
        None, "rename columns to mola's fields: question=query,answer=label"
    )
    template: str | None = _opt(
        None, "prompt template; None: chat for chat data, else alpaca", choices=TEMPLATES
    )
    train_limit: int | None = _opt(None, "use at most this many training examples")
    eval_limit: int | None = _opt(None, "evaluate on at most this many examples")
    # MoLA
    experts: str = _opt("inverted-triangle", "experts per layer: N, '2,4,6,8' or a shape name")
    top_k: str = _opt("2", "experts per token (layer spec)")
    r: str = _opt("8", "LoRA rank of each expert (layer spec)", aliases=("--rank",))
    alpha: float = _opt(16.0, "LoRA alpha; scale = alpha / r")
    dropout: float = _opt(0.05, "LoRA dropout")
    router: str = _opt("topk", "router", choices=tuple(ROUTERS))
    top_p: float | None = _opt(
        None, "cumulative probability (topp: default 0.5; dynmole: 0.75, the authors')"
    )
    target_modules: str = _opt(",".join(LLAMA_TARGETS), "comma-separated module names")
    aux_loss_coef: float = _opt(0.001, "load-balancing loss weight")
    router_z_loss_coef: float = _opt(0.0, "router z-loss weight")
    aux_loss_reduction: str | None = _opt(
        None,
        "how router losses add up over modules/layers (default: the router's authors' way)",
        choices=tuple(REDUCTIONS),
    )
    # expert structures, per-module allocation, pre-trained experts
    experts_structure: str = _opt("stacked", "expert structure", choices=tuple(STRUCTURES))
    module_patterns: str | None = _opt(
        None, "per-module overrides: JSON (or a YAML mapping) of module regex -> settings"
    )
    a_dropout: float = _opt(0.0, "MoSLD: dropout on the entries of the shared A")
    fly_sparsity: float | None = _opt(None, "FlyLoRA: nonzero share per row of A (top_k / r)")
    balance_bias_rate: float | None = _opt(
        None, "FlyLoRA/SMoRA: loss-free balancing bias step (default: the authors')"
    )
    smora_gating: str = _opt(
        "sigmoid", "SMoRA gates: sigmoid (the authors') or softmax", choices=("sigmoid", "softmax")
    )
    init_from: str | None = _opt(None, "start from this adapter (e.g. mola compose's output)")
    train_experts: bool = _opt(False, "with --init-from: train the experts too, not only routers")
    allocation: str | None = _opt(
        None, "YAML from mola allocate: per-layer num_experts and r (replace --experts/--r)"
    )
    # method presets and routers (mola methods; routing package)
    method: str | None = _opt(
        None, "a method preset (mola methods); flags and YAML override it", choices=tuple(METHODS)
    )
    router_scope: str = _opt(
        "module", "module: a router per module; block: one per sub-block", choices=SCOPES
    )
    sparsity_loss_coef: float = _opt(0.0, "ldmole: weight of the analytical sparsity loss")
    ldmole_hidden: int | None = _opt(
        None, "ldmole: width of the shared lambda MLP (default: the authors' by model size)"
    )
    entropy_threshold: float = _opt(0.9, "dynmole: normalised Tsallis entropy for all experts")
    entropy_index: float = _opt(1.1, "dynmole: Tsallis entropy index q")
    entropy_loss_coef: float = _opt(0.01, "dynmole: weight of the Tsallis entropy loss")
    max_threshold: float | None = _opt(None, "adamole: threshold cap (default 1 / experts)")
    l1_loss_coef: float = _opt(1e-8, "relu: start weight of the (load-balanced) L1 loss")
    l1_loss_alpha: float = _opt(1.2, "relu: ReMoE's per-step multiplier of the L1 weight; 1: fixed")
    lbc_groups: int = _opt(2, "loramoe: expert groups, one per data 'group' value")
    lbc_delta: float = _opt(0.1, "loramoe: localized balancing delta")
    lbc_loss_coef: float = _opt(0.0, "loramoe: weight of the localized balancing loss")
    # optimisation
    lr: float = _opt(5e-4, "peak learning rate")
    epochs: float = _opt(1.0, "training epochs (ignored when --max-steps > 0)")
    max_steps: int = _opt(-1, "optimizer steps; -1 = use --epochs")
    batch_size: int = _opt(8, "examples per device batch")
    grad_accum: int = _opt(
        1, "gradient accumulation steps (router losses are taken per micro-batch)"
    )
    warmup_ratio: float = _opt(0.05, "share of steps spent warming up the learning rate")
    scheduler: str = _opt("linear", "learning-rate schedule (a transformers scheduler name)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    cutoff_len: int = _opt(256, "truncate sequences to this many tokens")
    train_on_inputs: bool = _opt(False, "also train on the prompt tokens")
    gradient_checkpointing: bool = _opt(False, "trade compute for memory")
    bf16: bool | None = _opt(
        None, "bf16 mixed precision, fp32 master weights (default: on with a bf16 CUDA GPU)"
    )
    fp16: bool = _opt(False, "fp16 mixed precision with loss scaling (CUDA GPUs only)")
    seed: int = _opt(42, "random seed")
    # outputs
    output: str = _opt("runs/mola", "output directory")
    resume: bool = _opt(False, "resume from the last checkpoint in --output")
    overwrite: bool = _opt(False, "replace a finished run already in --output")
    save_steps: int = _opt(50, "save a checkpoint every N steps (0: only at the end)")
    logging_steps: int = _opt(10, "log every N steps")
    report_to: str = _opt(
        "tensorboard", "experiment trackers: tensorboard, wandb, mlflow, a comma list, or none"
    )
    # evaluation after training
    eval: bool = _opt(True, "evaluate on the test data after training")
    eval_before: bool = _opt(False, "also evaluate the base model (zero-shot) before training")
    scoring: str = _opt("loglik", "multiple-choice scoring", choices=("loglik", "generate"))
    eval_batch_size: int = _opt(16, "evaluation batch size")
    progress: bool = _opt(True, "show progress bars")
    dry_run: bool = _opt(
        False, "resolve everything on the meta device; print parameters and a memory estimate"
    )

    def __post_init__(self) -> None:
        """Check every option once, naming its flag and the accepted values."""
        for name in ("model", "task", "output", "scheduler", "router", "scoring"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"{_flag(name)}: must be a non-empty string")
        for name in ("template", "router", "scoring", "experts_structure", "dtype"):
            choices = _FIELDS[name].metadata["choices"]
            if name == "template" and self.template is None:
                continue  # chosen from the data: chat for conversations, else alpaca
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{_flag(name)}: {getattr(self, name)!r} is not one of {', '.join(choices)}"
                )
        if self.aux_loss_reduction is not None and self.aux_loss_reduction not in REDUCTIONS:
            raise ValueError(
                f"--aux-loss-reduction: {self.aux_loss_reduction!r} is not one of "
                f"{', '.join(REDUCTIONS)}"
            )
        quant_bits(self.load_in_4bit, self.load_in_8bit)
        if self.revision is not None and not str(self.revision).strip():
            raise ValueError("--revision: empty; give a branch, tag or commit")
        if self.data is None and self.task not in TASKS:
            from mola.data.mixture import task_names

            try:
                task_names(self.task)
            except ValueError as err:
                raise ValueError(f"--task: {err}") from None
        if self.scheduler not in _schedulers():
            raise ValueError(
                f"--scheduler: unknown schedule {self.scheduler!r}; choose from "
                f"{', '.join(_schedulers())}"
            )
        parse_columns(self.data_columns)
        parse_report_to(self.report_to)
        for name in ("data", "eval_data", "init_from"):
            if getattr(self, name) is not None and not str(getattr(self, name)).strip():
                raise ValueError(f"{_flag(name)}: empty file name")
        for name in ("batch_size", "grad_accum", "logging_steps", "eval_batch_size"):
            _check_int(name, getattr(self, name), 1)
        _check_int("cutoff_len", self.cutoff_len, 2)
        _check_int("save_steps", self.save_steps, 0, "(0: only at the end)")
        _check_int("seed", self.seed, 0)
        if self.seed >= 2**32:
            raise ValueError(f"--seed: must be < 2**32, got {self.seed}")
        for name in ("train_limit", "eval_limit"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if self.max_steps != -1:
            _check_int("max_steps", self.max_steps, 1, "(or -1 to train for --epochs)")
        check_number("--lr", self.lr, low=0.0, low_open=True)
        check_number("--epochs", self.epochs, low=0.0, low_open=True)
        check_number("--warmup-ratio", self.warmup_ratio, low=0.0, high=1.0)
        check_number("--weight-decay", self.weight_decay, low=0.0)
        check_number("--alpha", self.alpha, low=0.0, low_open=True)
        check_number("--dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        if self.top_p is not None:
            check_number("--top-p", self.top_p, low=0.0, high=1.0, low_open=True)
        check_number("--l1-loss-alpha", self.l1_loss_alpha, low=1.0)
        check_number("--aux-loss-coef", self.aux_loss_coef, low=0.0)
        check_number("--router-z-loss-coef", self.router_z_loss_coef, low=0.0)
        items = [t.strip() for t in str(self.target_modules).split(",")]
        if "" in items:
            raise ValueError(
                f"--target-modules: empty name in {self.target_modules!r}; "
                "give comma-separated names like q_proj,v_proj"
            )
        check_number("--a-dropout", self.a_dropout, low=0.0, high=1.0, high_open=True)
        if self.fly_sparsity is not None:
            check_number("--fly-sparsity", self.fly_sparsity, low=0.0, high=1.0, low_open=True)
        if self.balance_bias_rate is not None:
            check_number("--balance-bias-rate", self.balance_bias_rate, low=0.0)
        if self.smora_gating not in ("sigmoid", "softmax"):
            raise ValueError(
                f"--smora-gating: {self.smora_gating!r} is not one of sigmoid, softmax"
            )
        parse_patterns(self.module_patterns)
        experts = check_spec(self.experts, "--experts")
        ranks = check_spec(self.r, "--r")
        flags = _SPEC_FLAGS
        if STRUCTURES[self.experts_structure].rank_experts:
            experts, flags = ranks, ("--r", "--top-k")  # every rank is an expert
        if str(self.top_k).lower() not in ("none", ""):
            top_k = check_spec(self.top_k, "--top-k")
            if self.EXPERTS_FROM_FLAGS and not self.allocation and not self.init_from:
                check_top_k(experts, top_k, self.router, flags)
        elif self.router == "topk":
            raise ValueError("--top-k: the 'topk' router needs a top-k (e.g. 2)")

    def mola_config(self) -> MolaConfig:
        """The adapter configuration these options describe."""
        targets = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        top_k = None if str(self.top_k).lower() in ("none", "") else self.top_k
        experts, ranks = self.experts, self.r
        modules: dict[str, Any] = {}
        if self.allocation:  # mola allocate's per-layer lists replace --experts/--r (and top_k)
            from mola.core.allocation_file import read_allocation

            chosen = read_allocation(self.allocation)
            experts, ranks = chosen["num_experts"], chosen["r"]
            top_k = chosen.get("top_k", top_k)
            modules = chosen.get("modules") or {}
        return MolaConfig(
            target_modules=targets,
            num_experts=experts,
            r=ranks,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            top_k=top_k,
            router=self.router,
            top_p=self.top_p,
            aux_loss_coef=self.aux_loss_coef,
            router_z_loss_coef=self.router_z_loss_coef,
            aux_loss_reduction=self.aux_loss_reduction,
            experts_structure=self.experts_structure,
            module_patterns=parse_patterns(self.module_patterns),
            a_dropout=self.a_dropout,
            fly_sparsity=self.fly_sparsity,
            balance_bias_rate=self.balance_bias_rate,
            smora_gating=self.smora_gating,
            router_scope=self.router_scope,
            sparsity_loss_coef=self.sparsity_loss_coef,
            ldmole_hidden=self.ldmole_hidden,
            entropy_threshold=self.entropy_threshold,
            entropy_index=self.entropy_index,
            entropy_loss_coef=self.entropy_loss_coef,
            max_threshold=self.max_threshold,
            l1_loss_coef=self.l1_loss_coef,
            l1_loss_alpha=self.l1_loss_alpha,
            lbc_groups=self.lbc_groups,
            lbc_delta=self.lbc_delta,
            lbc_loss_coef=self.lbc_loss_coef,
            module_allocation=modules,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_options(self, device: str = "auto") -> LoadOptions:
        """How to load the base model: ``--revision``, ``--dtype``, ``--load-in-4bit/8bit``."""
        return LoadOptions(
            revision=self.revision,
            dtype=self.dtype,
            load_in_4bit=self.load_in_4bit,
            load_in_8bit=self.load_in_8bit,
            device=device,
        )


def parse_patterns(text: str | None) -> dict[str, Any]:
    """``--module-patterns``: a JSON object (a YAML mapping arrives here as JSON)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--module-patterns: invalid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise ValueError("--module-patterns: expected a JSON object of regex -> overrides")
    return value


_FIELDS = {f.name: f for f in fields(TrainOptions)}
_SPEC_FLAGS = ("--experts", "--top-k")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_int(name: str, value: object, low: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(
            f"{_flag(name)}: must be an integer >= {low}{' ' + note if note else ''}, got {value!r}"
        )


def _schedulers() -> tuple[str, ...]:
    from transformers import SchedulerType

    return tuple(s.value for s in SchedulerType)


def _type_of(f: dataclasses.Field) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    for name, cast in (("bool", bool), ("int", int), ("float", float)):
        if kind.startswith(name):
            return cast
    return str


def add_option_flags(
    parser: argparse.ArgumentParser,
    cls: type = TrainOptions,
    defaults: dict[str, Any] | None = None,
) -> None:
    """One flag per field; defaults are left unset so a config file can fill them.

    ``defaults`` overrides the dataclass defaults shown in ``--help`` (``mola demo``'s recipe).
    A field's ``aliases`` metadata adds other spellings of its flag: ``--rank`` for ``--r``,
    which ``torchrun`` would otherwise take as an abbreviation of one of its own options.
    """
    parser.add_argument("config", nargs="?", help="YAML file of options (flags override it)")
    for f in fields(cls):
        if f.name in cls.NO_FLAG:
            continue
        kind = _type_of(f)
        meta = f.metadata
        flags = ["--" + f.name.replace("_", "-"), *meta.get("aliases", ())]
        default = (defaults or {}).get(f.name, f.default)
        help_ = f"{meta.get('help', '')} (default: {default})"
        if kind is bool:
            parser.add_argument(
                *flags, action=argparse.BooleanOptionalAction, default=None, help=help_
            )
        else:
            parser.add_argument(
                *flags,
                type=kind,
                default=None,
                choices=meta.get("choices"),
                help=help_,
                metavar=f.name.upper(),
            )


def options_from_args(args: argparse.Namespace, cls: type = TrainOptions, **overrides: Any):
    """Merge defaults, an optional YAML file (``args.config``) and the given flags."""
    values: dict[str, Any] = dict(overrides)
    if getattr(args, "config", None):
        values.update(read_yaml(args.config, cls))
    for f in fields(cls):
        flag_value = getattr(args, f.name, None)
        if flag_value is not None:
            values[f.name] = flag_value
    if "method" in {f.name for f in fields(cls)}:
        from mola.methods import apply_method

        values = apply_method(values)  # the preset under everything the user gave
    return cls(**values)


def read_yaml(path: str, cls: type = TrainOptions) -> dict[str, Any]:
    """Options from a YAML mapping; keys may use ``-`` or ``_``.

    Raises:
        ValueError: unreadable file, not a mapping, or unknown keys (listed).
    """
    if not os.path.isfile(path):
        raise ValueError(f"config file {path} not found")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ValueError(f"config file {path}{where}: invalid YAML") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of option: value")
    known = {f.name: f for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(f"config file {path}: unknown option {key!r}")
        kind = _type_of(known[name])
        if value is not None and kind is not str and not isinstance(value, kind):
            try:
                value = kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"config file {path}: {key} must be a {kind.__name__}") from None
        if kind is str and isinstance(value, dict):
            value = json.dumps(value)
        if kind is str and isinstance(value, list):
            value = ",".join(str(v) for v in value)
        out[name] = str(value) if kind is str and value is not None else value
    return out
