"""Named method presets: ``mola train --method NAME`` (or ``method: NAME`` in YAML).

A preset is a set of training options (:class:`~mola.training.options.TrainOptions` fields)
that reproduces a paper's configuration inside mola. It sits between the defaults and
everything the user gives: defaults < preset < YAML file < flags, so any key can be overridden.
``mola methods`` lists them. docs/methods.md gives each method's formula, the authors' code it
follows, its defaults and every deliberate difference; in short:

* ``mola``: MoLA (Gao et al. 2024, arXiv 2402.08562), mola's defaults: inverted-triangle experts
  2-4-6-8, top-2 of ``softmax(Rx)`` per adapted module, load-balancing loss weight 0.001.
* ``mixlora``: MixLoRA (Li et al. 2024, arXiv 2404.15159; MoE-PEFT's ``mixlora``): 8 experts on
  the MLP projections, one top-2 router per MLP block computed from the block's input and shared
  by gate/up/down (``router_scope: block``), balance weight 0.01 (the MixLoRA README's configs;
  the code's fallback is 0.001) on Mixtral's loss taken once over all layers
  (``aux_loss_reduction: mixtral``, as MoE-PEFT's ``_mixtral_load_balancing_loss_func``), and an
  independent plain LoRA (one expert, no router, via ``module_patterns``) on each attention
  projection q/k/v/o, as the paper and the authors' code do (TUDB-Labs/MixLoRA ``mixlora/model.py``
  puts a ``LoraLinear`` on every targeted ``self_attn`` projection; MoE-PEFT's
  ``templates/mixlora.json`` targets q/k/v/o and gate/up/down with r 16, alpha 32, dropout 0.05,
  which the preset also sets).
* ``llava-mole``: LLaVA-MoLE (Chen et al. 2024, arXiv 2401.16160): 3 experts on the MLP, top-1,
  one router per MLP block (sparse; the selected expert's gate is 1), and a plain LoRA on the
  attention projections: the paper replaces LLaVA-1.5's plain LoRA (on every linear layer) with
  LoRA experts "specifically for the MLP layer", so attention keeps its plain LoRA (read from the
  abstract; the rank, LLaVA-1.5's 128, is left at mola's default).
* ``loramoe``: LoRAMoE (Dou et al. 2024, arXiv 2312.09979): 6 experts of rank 4 (alpha 32) on
  the MLP projections, every expert used with its softmax weight, the localized balancing
  constraint (the authors' ``cv_squared``, delta 0.1, weight 0.1, summed over modules; examples
  carry an optional ``group``).
* ``ld-mole``: LD-MoLE (Zhuang et al., ICLR 2026): 8 experts of r 8, alpha 16, dropout 0.1 on
  all projections (``conf/model/*.yaml``), sparsegen routing with a shared lambda MLP, balance
  weight 1.0 and sparsity loss off, as the authors' ``run.sh`` (``lb_loss_coef=1.0``,
  ``reg_loss_coef=0.0``), each loss averaged over all modules (``module_mean``, their
  ``loss/loss.py``); ``top_k`` 2 is the sparsity loss' target when ``--sparsity-loss-coef`` is
  set.
* ``dynmole``: DynMoLE (Li et al. 2025, arXiv 2504.00661): 8 experts, Tsallis entropy index 1.1,
  threshold 0.9, top-p 0.75, at least 2 experts, balance 0.001 and entropy loss 0.01 (the
  authors' defaults, also the ``dynmole`` router's without the preset), both taken once over
  all layers' router outputs concatenated (``global``).
* ``adamole``: AdaMoLE (Liu & Luo, COLM 2024): 8 experts of rank 4 (the authors' total rank
  32 split over 8 experts) on q/k/v/o, alpha 16, dropout 0.05, learned threshold capped at
  ``1/E``, balance weight 0.001 (``configs/llama_adamole_csr_train.config``), summed over modules
  (``module_sum``, their ``get_aux_loss``).
* ``remoe``: ReMoE (Wang et al., ICLR 2025): 8 experts on the MLP with one ReLU router per MLP
  block, the adaptive L1 starting at 1e-8 and multiplied or divided by 1.2 each step towards
  ``1 - 1/8`` sparsity (``--moe-router-topk 1`` in ``scripts/train_llama_*_remoe.sh``), one loss
  per layer summed over layers (their router's ``MoEAuxLossAutoScaler``).

Expert structures (:mod:`mola.experts`; each structure's docstring has the formula and the
open choices):

* ``hydralora``: HydraLoRA: one shared ``A``, 4 ``B`` heads, soft router (all heads weighted by
  ``softmax(W x)``), rank 4, alpha 32, on the MLP, no balance loss: the authors'
  ``fine-tuning.sh`` (Clin0212/HydraLoRA).
* ``mosld``: MoSLD: shared ``A`` with dropout 0.1 on its entries (the paper's rate was not
  recovered here), 8 heads, top-2, on ``q_proj``/``v_proj`` as the paper applies it.
* ``smora``: SMoRA: rank 64, 8 active ranks per token, alpha 16, dropout 0, on every linear
  projection (``lora_target: all``), as the authors' ``llama2_7b_lora_srmole.yaml``; sigmoid
  scores, gates ``k`` times the normalised biased scores, scale ``alpha / k`` and the
  loss-free balancing bias with step 1e-5 (their ``srmole/layer.py``), no balance loss.
* ``flylora``: FlyLoRA: rank 32, top-8, alpha 64, no dropout, bias rate 0.001 (the authors'
  ``run_mmlu.sh``); ``A`` frozen with ``d // (r // k)`` nonzeros per row (their PEFT fork).
* ``comol``: CoMoL: 8 core experts of 16 x 16 between one shared A and B (r 16, alpha = r,
  dropout 0.1), all merged by a dense softmax of the router on ``A x``, on q/k/v/o/down, as the
  authors' ``configs/codealpaca20k/llama-3-1-8b-instruct_mocorelora-corerouter_train.config``
  and ``train.py`` (``lora_alpha = lora_rank``, ``lora_dropout = 0.1``); no balance loss (they
  have none).
* ``hilo``: HILO: 2-4-6-8 experts and ranks 2-4-6-8 over four layer groups (the rank setting the
  paper reports best), top-2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MLP_TARGETS = "gate_proj,up_proj,down_proj"
ATTENTION_MLP_TARGETS = "q_proj,k_proj,v_proj,o_proj," + MLP_TARGETS
PLAIN_LORA_ATTENTION = '{"q_proj|k_proj|v_proj|o_proj": {"num_experts": 1}}'  # module_patterns


@dataclass(frozen=True)
class Method:
    """One preset: its name, a one-line description, the paper and the options it sets."""

    name: str
    description: str
    paper: str
    settings: dict[str, Any] = field(default_factory=dict)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "mola",
            "layer-wise expert counts (inverted triangle), top-2 per module",
            "Gao et al. 2024, Higher Layers Need More LoRA Experts, arXiv 2402.08562",
        ),
        Method(
            "mixlora",
            "8 experts on the MLP, one top-2 router per MLP block; plain LoRA on attention",
            "Li et al. 2024, MixLoRA, arXiv 2404.15159",
            {
                "experts": "8",
                "top_k": "2",
                "r": "16",
                "alpha": 32.0,
                "dropout": 0.05,
                "router": "topk",
                "router_scope": "block",
                "target_modules": ATTENTION_MLP_TARGETS,
                "module_patterns": PLAIN_LORA_ATTENTION,
                "aux_loss_coef": 0.01,
                "aux_loss_reduction": "mixtral",
            },
        ),
        Method(
            "llava-mole",
            "3 experts on the MLP, top-1, one router per MLP block; plain LoRA on attention",
            "Chen et al. 2024, LLaVA-MoLE, arXiv 2401.16160",
            {
                "experts": "3",
                "top_k": "1",
                "router": "topk",
                "router_scope": "block",
                "target_modules": ATTENTION_MLP_TARGETS,
                "module_patterns": PLAIN_LORA_ATTENTION,
                "aux_loss_coef": 0.01,
            },
        ),
        Method(
            "loramoe",
            "6 soft-routed experts on the MLP, localized balancing over expert groups",
            "Dou et al. 2024, LoRAMoE, arXiv 2312.09979",
            {
                "experts": "6",
                "r": "4",
                "alpha": 32.0,
                "router": "loramoe",
                "target_modules": MLP_TARGETS,
                "aux_loss_coef": 0.0,
                "lbc_loss_coef": 0.1,
                "lbc_delta": 0.1,
            },
        ),
        Method(
            "ld-mole",
            "sparsegen routing, token lambda from a shared MLP: dynamic experts per token",
            "Zhuang et al., LD-MoLE, ICLR 2026, arXiv 2509.25684",
            {
                "experts": "8",
                "top_k": "2",
                "r": "8",
                "alpha": 16.0,
                "dropout": 0.1,
                "router": "ldmole",
                "aux_loss_coef": 1.0,
                "sparsity_loss_coef": 0.0,
            },
        ),
        Method(
            "dynmole",
            "Tsallis-entropy hybrid routing: top-p, or every expert when uncertain",
            "Li et al. 2025, DynMoLE, arXiv 2504.00661",
            {
                "experts": "8",
                "top_k": "2",
                "top_p": 0.75,
                "router": "dynmole",
                "aux_loss_coef": 0.001,
                "entropy_loss_coef": 0.01,
            },
        ),
        Method(
            "adamole",
            "experts above a learned per-token threshold",
            "Liu & Luo, AdaMoLE, COLM 2024, arXiv 2405.00361",
            {
                "experts": "8",
                "top_k": "none",
                "r": "4",
                "alpha": 16.0,
                "dropout": 0.05,
                "router": "adamole",
                "target_modules": "q_proj,k_proj,v_proj,o_proj",
                "aux_loss_coef": 0.001,
            },
        ),
        Method(
            "remoe",
            "ReLU router on the MLP, adaptive L1 towards 1 of 8 experts per token",
            "Wang et al., ReMoE, ICLR 2025, arXiv 2412.14711",
            {
                "experts": "8",
                "top_k": "1",
                "router": "relu",
                "router_scope": "block",
                "target_modules": MLP_TARGETS,
                "aux_loss_coef": 0.0,
                "l1_loss_coef": 1e-8,
                "l1_loss_alpha": 1.2,
            },
        ),
        # expert structures (mola.experts)
        Method(
            "hydralora",
            "one shared A, 4 B heads mixed by a soft router, on the MLP",
            "Tian et al. 2024, HydraLoRA, NeurIPS 2024, arXiv 2404.19245",
            {
                "experts_structure": "shared_a",
                "experts": "4",
                "r": "4",
                "alpha": 32.0,
                "router": "soft",
                "target_modules": MLP_TARGETS,
                "aux_loss_coef": 0.0,
            },
        ),
        Method(
            "mosld",
            "one shared A with dropout on its entries, 8 B heads, top-2",
            "Zhao et al. 2025, MoSLD, COLING 2025, arXiv 2412.08946",
            {
                "experts_structure": "shared_a",
                "experts": "8",
                "top_k": "2",
                "a_dropout": 0.1,
                "target_modules": "q_proj,v_proj",
            },
        ),
        Method(
            "smora",
            "every rank of a rank-64 LoRA an expert, 8 per token, loss-free balancing",
            "Zhao et al. 2025, Each Rank Could be an Expert (SMoRA), arXiv 2501.15103",
            {
                "experts_structure": "rankwise",
                "r": "64",
                "top_k": "8",
                "alpha": 16.0,
                "dropout": 0.0,
                "aux_loss_coef": 0.0,
                "balance_bias_rate": 1e-5,
                "smora_gating": "sigmoid",
            },
        ),
        Method(
            "flylora",
            "frozen sparse random A routes implicitly: top-8 of 32 ranks, only B trained",
            "Zou et al. 2025, FlyLoRA, NeurIPS 2025, arXiv 2510.08396",
            {
                "experts_structure": "flylora",
                "r": "32",
                "top_k": "8",
                "alpha": 64.0,
                "dropout": 0.0,
                "aux_loss_coef": 0.0,
                "balance_bias_rate": 0.001,
            },
        ),
        Method(
            "comol",
            "8 r x r core experts between one shared A and B, all merged by softmax on A x",
            "Cao et al. 2026, CoMoL, arXiv 2603.00573",
            {
                "experts_structure": "core",
                "experts": "8",
                "top_k": "none",
                "router": "soft",
                "r": "16",
                "alpha": 16.0,
                "dropout": 0.1,
                "aux_loss_coef": 0.0,
                "target_modules": "q_proj,k_proj,v_proj,o_proj,down_proj",
            },
        ),
        Method(
            "hilo",
            "experts and rank both grow with depth: 2-4-6-8 experts of rank 2-4-6-8",
            "Cong et al. 2025, Rank Also Matters (HILO), arXiv 2502.03884",
            {"experts": "2,4,6,8", "r": "2,4,6,8", "top_k": "2"},
        ),
    )
}


def method_settings(name: str) -> dict[str, Any]:
    """The options preset ``name`` sets (``ValueError`` naming the choices if unknown)."""
    if name not in METHODS:
        raise ValueError(f"--method: unknown method {name!r}; choose from {', '.join(METHODS)}")
    return dict(METHODS[name].settings)


def apply_method(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (the options the user gave) over the preset ``values['method']`` names."""
    name = values.get("method")
    if not name:
        return values
    return {**method_settings(name), **values}
