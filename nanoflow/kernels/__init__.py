"""Kernels, one module each: the plain PyTorch reference (`*_ref`) beside its fast version.

The eager/reference path of the model calls the `*_ref` functions; the fast path swaps in the
Triton kernels where a CUDA device is present. Tests compare each pair.
"""
