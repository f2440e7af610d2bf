"""fastres's Triton kernels: implicit-GEMM convolution (:mod:`.conv`), NHWC max-pool
(:mod:`.pool`), the avgpool+linear head (:mod:`.head`) and their autotuning tables
(:mod:`.configs`). :mod:`.triton_impls` registers them as the ``triton`` backend.

Importing this package does not import Triton; the submodules do.
"""
