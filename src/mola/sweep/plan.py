"""What each run of a sweep will train, before training it: total experts, trainable parameters.

The base model is built from its config on the ``meta`` device (no weights read, no memory), the
run's MoLA config injected, and its parameters counted, so the numbers are the ones training will
report in ``metrics.json``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from mola.sweep.spec import Run
from mola.training.options import TrainOptions


def run_size(run: Run) -> tuple[int, int]:
    """``(total_experts, trainable_params)`` of a run; total experts = experts per adapted module
    summed over the decoder layers."""
    opts = TrainOptions(**run.options)
    config = json.dumps(opts.mola_config().to_dict(), sort_keys=True, default=str)
    return _size(_model_dir(opts.model), config)


def _model_dir(model: str) -> str:
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    from mola.models.hub import BUILTIN_MODELS, builtin_model_dir
    from mola.models.hub_ids import hub_config_file, is_hub_id

    if model not in BUILTIN_MODELS and is_hub_id(model):  # its config.json alone
        return str(hub_config_file(model).parent)
    return str(builtin_model_dir(model, progress=False))


@lru_cache(maxsize=64)
def _size(model_dir: str, config_json: str) -> tuple[int, int]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mola.core.config import MolaConfig
    from mola.core.model import get_mola_model

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    model = get_mola_model(base, MolaConfig.from_dict(json.loads(config_json)))
    trainable, _ = model.num_parameters_split()
    return int(sum(model.allocation["num_experts"])), int(trainable)
