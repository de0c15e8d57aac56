"""nnopt's layer classes and the kernels they run, below the techniques that create them.

Every layer here implements the compressed-layer protocol (:mod:`nnopt.layers.protocol`), through which
profile, energy, saving and export read it: int8 (:mod:`~nnopt.layers.int8`), weight-only int8/int4
(:mod:`~nnopt.layers.weight_only`), clustered (:mod:`~nnopt.layers.clustered`) and sparse CSR
(:mod:`~nnopt.layers.sparse`) layers; the low-rank pair (:mod:`~nnopt.layers.lowrank`) is a container of
plain Linears. The int8 GEMMs are chosen by CPU feature and known-answer checks (:mod:`~nnopt.layers.kernels`,
:mod:`~nnopt.layers.kernel_checks`); quantization maths lives in :mod:`~nnopt.layers.primitives`.
"""
