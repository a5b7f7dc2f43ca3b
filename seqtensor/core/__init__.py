"""The op's semantics: folds (how n tokens map onto n_1 x ... x n_m), positions, and the hop plan.

Nothing here runs attention; ``seqtensor.kernels`` implements the plan and ``seqtensor.attention``
dispatches to a kernel.
"""
