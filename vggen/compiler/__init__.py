"""Compiler: equations lowered to kernel IR, passes over it, and per-target schedules, printers and templates that emit C and CUDA."""
