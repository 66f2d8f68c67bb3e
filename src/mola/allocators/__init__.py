"""Automatic layer-wise allocation of experts and ranks (``mola allocate``)."""
