"""Fixtures shared by the test modules."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="module")
def c_backend(tmp_path_factory):
    """The C backend on the repository's generated kernels (built into a
    temporary directory if they are missing), with a compile cache of its own."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    from vggen.runtime.c import CBackend
    gen = REPO / "generated"
    if not (gen / "manifest.json").is_file():
        from vggen.compiler.emit import build
        gen = tmp_path_factory.mktemp("generated")
        build(gen)
    return CBackend(generated=gen, cache=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def own_op_cache(tmp_path_factory):
    """vggen.compile's cache of the module's own; the in-process memo emptied before and after."""
    from vggen import ops

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VGGEN_CACHE_DIR", str(tmp_path_factory.mktemp("vggen-cache")))
        ops._OPS.clear()
        yield
        ops._OPS.clear()
