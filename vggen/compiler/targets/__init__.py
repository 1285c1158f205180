"""Targets: one package per emitted language (c, cuda)."""
