"""Derivation: reverse-mode differentiation of a layer's equations into gather-form backward equations, and their simplification."""
