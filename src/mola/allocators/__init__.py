"""Automatic layer-wise allocation of experts and ranks (``mola allocate``).

* :mod:`mola.allocators.budget`: fit per-layer weights to an exact budget of experts or params;
* :mod:`mola.allocators.gsv` and :mod:`mola.allocators.guilomo`: GuiLoMo's GuidedSelection
  Vectors and their bilevel search;
* :mod:`mola.allocators.redundancy`: the cheap baseline (expert redundancy of a uniform probe);
* :mod:`mola.allocators.plot`: the allocation figure (the YAML format is
  :mod:`mola.core.allocation_file`, which training reads);
* :mod:`mola.allocators.job`: the ``mola allocate`` job.
"""
