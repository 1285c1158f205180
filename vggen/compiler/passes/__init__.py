"""The target-neutral passes of the kernel pipeline, one a module (see ``vggen.compiler.pipeline``)."""
