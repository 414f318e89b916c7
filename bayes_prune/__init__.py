"""Bayesian neural-network pruning experiments (see README.md)."""

__version__ = "0.1.0"
