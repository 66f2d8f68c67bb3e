"""Expert structures of the MoE-LoRA literature behind one interface (see :mod:`.base`)."""

from mola.experts.base import Experts, StructureOptions
from mola.experts.registry import STRUCTURES, check_structure

__all__ = ["STRUCTURES", "Experts", "StructureOptions", "check_structure"]
