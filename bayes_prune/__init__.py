"""Bayesian neural-network pruning experiments (see README.md)."""

import torch

__version__ = "0.1.0"

# Adam with the posterior objective (an L2 prior gradient, methods.md A6) walks the weights of dead
# ReLU units down into float32 denormals, which made late CPU epochs 5-15x slower (measured: 86 s vs
# 6 s per MNIST FCN epoch). Flushing them to zero must be set before torch starts its CPU thread
# pool, since worker threads inherit the floating-point mode of the thread that creates them.
torch.set_flush_denormal(True)
