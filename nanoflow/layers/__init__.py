"""Model building blocks. Each layer owns its weights (and how a checkpoint tensor is sharded into
them) and calls a kernel from nanoflow.kernels or that kernel's PyTorch reference."""
