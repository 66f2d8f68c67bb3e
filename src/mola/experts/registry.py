"""The expert structures by config name (``experts_structure``)."""

from __future__ import annotations

from mola.experts.base import Experts
from mola.experts.core import CoreSpaceExperts
from mola.experts.flylora import FlyLoRAExperts
from mola.experts.rankwise import RankWiseExperts
from mola.experts.shared import SharedAExperts
from mola.experts.stacked import StackedExperts

STRUCTURES: dict[str, type[Experts]] = {
    cls.structure: cls
    for cls in (StackedExperts, SharedAExperts, RankWiseExperts, FlyLoRAExperts, CoreSpaceExperts)
}


def check_structure(name: str) -> type[Experts]:
    """The structure class called ``name``.

    Raises:
        ValueError: unknown name (the known ones are listed).
    """
    if name not in STRUCTURES:
        raise ValueError(
            f"experts_structure: unknown structure {name!r}; choose from {', '.join(STRUCTURES)}"
        )
    return STRUCTURES[name]
