"""The C (OpenMP) target."""
