"""vggen: VGG layers written once as index-notation equations in SymPy;
backward passes derived and proved; C (OpenMP) and CUDA kernels emitted."""

__version__ = "0.1.0"
