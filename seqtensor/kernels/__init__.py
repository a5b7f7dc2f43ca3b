"""Tensorized-attention kernels: ``reference`` (PyTorch oracle) and ``tensorized`` (Triton)."""
