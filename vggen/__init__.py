"""vggen: VGG layers written once as index-notation equations in SymPy;
backward passes derived and proved; C (OpenMP) and CUDA kernels emitted.

``vggen.compile(layer, target)`` runs a layer of your own (:mod:`vggen.ops`);
``vggen.torch.function(layer)`` makes it a PyTorch autograd function
(:mod:`vggen.torch`).  Both load on first use: ``import vggen`` stays cheap.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # lazy: the op API pulls in SymPy and NumPy, vggen.torch pulls in PyTorch
    if name == "compile":
        from vggen.ops import compile

        return compile
    if name == "torch":
        import importlib

        return importlib.import_module("vggen.torch")
    raise AttributeError(f"module 'vggen' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), "compile", "torch"])
