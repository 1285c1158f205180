"""The runtime runs only kernels and libraries it can trust.

Generated sources that differ from ``generated/manifest.json`` are refused
(or, with ``--allow-modified-kernels``, run with a warning); a damaged
compiled library is rebuilt, never loaded; an unusable cache directory gives
way to a private one.  Every run goes through ``vggen`` in a subprocess with
its caches under ``tmp_path``, so the user's cache is never touched.

A full compile of the kernels takes up to tens of seconds, so it is done
once (``compiled``); a test that makes vggen compile again gets, as ``$CC``,
a stand-in that answers ``--version`` as the real compiler does (the cache
key is the same) and hands out that library.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.cli import TINY, digest, one_line_error, vggen
from vggen.errors import VggenError
from vggen.manifest import read_manifest
from vggen.paths import shipped_generated

TRAIN = ("train", *TINY, "--epochs", "1")
BENCH = ("bench", "--target", "c", "--no-torch", "--steps", "1", "--warmup", "0", "--width", "2",
         "--batch-size", "8", "-q")
EDIT = ("var[c] + 2e-05f", "var[c] + 1e-03f")      # one constant of vggen_kernels.c


def env_for(tmp: Path, cache: Path | str = "", **more) -> dict:
    """The environment of a run: libraries cached in ``cache`` (unset: under ``tmp``'s
    XDG cache), the shipped kernels."""
    return {"VGGEN_CACHE_DIR": str(cache), "XDG_CACHE_HOME": str(tmp / "xdg"), "VGGEN_GENERATED": "",
            "TQDM_DISABLE": "1", **more}


def stderr_lines(res: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 0, (res.returncode, res.stderr)
    return res.stderr.strip().splitlines()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    """The shipped kernels compiled once, by `vggen train`, into the module's cache: the ``.so``."""
    if shutil.which(os.environ.get("CC") or "cc") is None:
        pytest.skip("no C compiler")
    tmp = tmp_path_factory.mktemp("compiled")
    res = vggen(*TRAIN, env=env_for(tmp, tmp / "cache"), cwd=tmp)
    assert stderr_lines(res) == []
    [library] = (tmp / "cache").glob("*.so")
    return library


@pytest.fixture(scope="module")
def stand_in(compiled, tmp_path_factory) -> dict:
    """``$CC`` for a run that compiles: answers ``--version`` as the real compiler,
    and "compiles" by copying ``compiled``, logging its arguments to ``log``."""
    from vggen.runtime.c import find_compiler
    where = tmp_path_factory.mktemp("cc")
    log = where / "log"
    script = where / "cc"
    script.write_text(f"""#!/bin/sh
if [ "$1" = --version ]; then exec {shlex.quote(find_compiler())} --version; fi
echo "$@" >> {shlex.quote(str(log))}
while [ $# -gt 1 ]; do
    if [ "$1" = -o ]; then exec cp {shlex.quote(str(compiled))} "$2"; fi
    shift
done
exit 1
""")
    script.chmod(0o755)
    return {"CC": str(script), "log": log}


def cache_with(compiled: Path, cache: Path) -> Path:
    """A cache holding the compiled library and its record; returns the library there."""
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copy2(compiled.with_suffix(".json"), cache)
    return Path(shutil.copy2(compiled, cache))


def generated_copy(tmp: Path) -> Path:
    return Path(shutil.copytree(shipped_generated(), tmp / "generated"))


def assert_whole(library: Path, compiled: Path) -> None:
    """The cache entry is the library with a record that vouches for it, and nothing else."""
    record = json.loads(library.with_suffix(".json").read_text())
    assert record["key"] == library.stem and record["size"] == library.stat().st_size
    assert record["sha256"] == digest(library) == digest(compiled)
    assert sorted(p.name for p in library.parent.iterdir()) == [f"{library.stem}.json", library.name]


# --------------------------------------------------------------------------- edited kernels


def test_an_edited_kernel_is_refused_unless_allowed(tmp_path, stand_in):
    gen = generated_copy(tmp_path)
    source = gen / "c" / "vggen_kernels.c"
    text = source.read_text()
    assert EDIT[0] in text
    source.write_text(text.replace(EDIT[0], EDIT[1], 1))
    env = env_for(tmp_path, tmp_path / "cache", VGGEN_GENERATED=str(gen), CC=stand_in["CC"])

    # the file as the user would type it: relative to the working directory, here tmp_path
    res = vggen(*TRAIN, env=env, cwd=tmp_path)
    one_line_error(res, "generated/c/vggen_kernels.c differs from the manifest", "`vggen build`",
                   "--allow-modified-kernels")
    assert not (tmp_path / "cache").exists()              # refused before compiling anything

    res = vggen(*TRAIN, "--allow-modified-kernels", env=env, cwd=tmp_path)
    [warning] = stderr_lines(res)
    assert warning == ("vggen: warning: running MODIFIED kernels: generated/c/vggen_kernels.c differs "
                       "from the manifest (vggen build restores it)")
    assert str(source) in stand_in["log"].read_text()     # the edited file is what was compiled


@pytest.mark.parametrize("change, words", [
    (lambda c: (c / "extra.c").write_text("int vg_extra(void) { return 1; }\n"),
     ("extra.c", "is not listed in the manifest")),
    (lambda c: (c / "vggen_kernels.h").unlink(), ("vggen_kernels.h", "listed in the manifest but missing")),
], ids=["unlisted", "missing"])
def test_a_source_the_manifest_does_not_vouch_for_is_refused(tmp_path, change, words):
    gen = generated_copy(tmp_path)
    change(gen / "c")
    res = vggen(*TRAIN, env=env_for(tmp_path, tmp_path / "cache", VGGEN_GENERATED=str(gen)), cwd=tmp_path)
    one_line_error(res, *words, "`vggen build`")
    assert not (tmp_path / "cache").exists()


def test_cuda_sources_are_held_to_the_manifest(tmp_path, caplog):
    gen = generated_copy(tmp_path)
    manifest = read_manifest(gen)
    assert manifest.verify_sources("cuda") == []
    kernel = gen / "cuda" / "convolution2d.cu"
    kernel.write_text(kernel.read_text().replace("0.0f", "1.0f", 1))
    with pytest.raises(VggenError) as e:
        manifest.verify_sources("cuda")
    assert "\n" not in str(e.value)
    assert "cuda/convolution2d.cu differs from the manifest" in str(e.value)
    assert "`vggen build`" in str(e.value) and "--allow-modified-kernels" in str(e.value)
    assert manifest.verify_sources("c") == []             # the other target is not concerned
    (gen / "cuda" / "extra.cuh").write_text("#define VG_EXTRA 1\n")
    with caplog.at_level("WARNING", logger="vggen.manifest"):
        assert manifest.verify_sources("cuda", allow_modified=True) == [kernel, gen / "cuda" / "extra.cuh"]
    [record] = caplog.records
    assert record.getMessage().startswith("running MODIFIED kernels: ") and "convolution2d.cu" in record.getMessage()


def test_a_backend_that_runs_modified_kernels_serves_no_strict_request(monkeypatch):
    import vggen.runtime as runtime

    class Backend:
        def __init__(self, allow_modified_kernels=False):
            self.allow_modified_kernels = allow_modified_kernels

    monkeypatch.setattr(runtime, "_BACKENDS", {})
    monkeypatch.setitem(runtime._FACTORIES, "c", Backend)
    loose = runtime.get_backend("c", allow_modified_kernels=True)
    assert runtime.get_backend("c", allow_modified_kernels=True) is loose
    strict = runtime.get_backend("c")
    assert strict is not loose and not strict.allow_modified_kernels
    assert runtime.get_backend("c", allow_modified_kernels=True) is strict    # checked: serves both
    assert runtime.get_backend("numpy", allow_modified_kernels=True) is runtime.get_backend("numpy")


# --------------------------------------------------------------------------- damaged libraries


def _truncate(library: Path) -> str:
    os.truncate(library, 10240)
    return "size 10240"


def _garble(library: Path) -> str:
    library.with_suffix(".json").write_text('{"key": ')
    return "is unreadable"


@pytest.mark.parametrize("damage, command", [(_truncate, TRAIN), (_garble, TRAIN), (_truncate, BENCH)],
                         ids=["truncated-train", "garbled-record-train", "truncated-bench"])
def test_a_damaged_library_is_rebuilt_not_loaded(tmp_path, compiled, stand_in, damage, command):
    library = cache_with(compiled, tmp_path / "cache")
    why = damage(library)
    res = vggen(*command, env=env_for(tmp_path, tmp_path / "cache", CC=stand_in["CC"]), cwd=tmp_path)
    [warning] = stderr_lines(res)                  # a SIGBUS would be status -7 here
    assert warning.startswith(f"vggen: warning: compiled library {library} is damaged (")
    assert why in warning and warning.endswith(": rebuilding")
    assert_whole(library, compiled)


def test_temporaries_of_a_dead_compile_are_removed(tmp_path, compiled):
    library = cache_with(compiled, tmp_path / "cache")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = [library.parent / f".{library.stem}.{gone.pid}.deadbeef.so",
             library.parent / f".{library.stem}.{gone.pid}.deadbeef.json"]
    running = library.parent / f".{library.stem}.{os.getpid()}.0badf00d.so"    # this process: alive
    for path in stale + [running]:
        path.write_bytes(b"\x7fELF half")
    res = vggen(*TRAIN, env=env_for(tmp_path, tmp_path / "cache"), cwd=tmp_path)
    assert stderr_lines(res) == []
    assert not any(p.exists() for p in stale) and running.exists()


def test_cache_clear_removes_libraries_records_and_temporaries(tmp_path, compiled):
    library = cache_with(compiled, tmp_path / "cache")
    cache = library.parent
    ours = [library, library.with_suffix(".json"), cache / f".{library.stem}.1234.deadbeef.so",
            cache / f".{library.stem}.1234.deadbeef.json"]
    for path in ours[2:]:
        path.write_bytes(b"x")
    theirs = [cache / "notes.json", cache / "libother.so", cache / f"{library.stem}.json.txt"]
    for path in theirs:
        path.write_text("not vggen's")
    res = vggen("cache", "clear", env=env_for(tmp_path, cache), cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("removed 2 compiled libraries"), res
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)


# --------------------------------------------------------------------------- unusable caches


def _xdg_read_only(tmp: Path, read_only: Path) -> tuple[dict, Path]:
    return {"XDG_CACHE_HOME": str(read_only)}, read_only / "vggen"


def _cache_dir_a_file(tmp: Path, read_only: Path) -> tuple[dict, Path]:
    file = tmp / "a-file"
    file.write_text("not a directory")
    return {"VGGEN_CACHE_DIR": str(file)}, file


def _home_read_only(tmp: Path, read_only: Path) -> tuple[dict, Path]:
    return {"HOME": str(read_only), "XDG_CACHE_HOME": ""}, read_only / ".cache" / "vggen"


@pytest.mark.parametrize("setup", [_xdg_read_only, _cache_dir_a_file, _home_read_only],
                         ids=["xdg-read-only", "cache-dir-a-file", "home-read-only"])
def test_an_unusable_cache_falls_back_to_a_private_directory(tmp_path, read_only_dir, stand_in, setup):
    more, cache = setup(tmp_path, read_only_dir)
    res = vggen(*TRAIN, env={**env_for(tmp_path), **more, "CC": stand_in["CC"]}, cwd=tmp_path)
    [warning] = stderr_lines(res)
    assert warning.startswith(f"vggen: warning: cache directory {cache} is unusable ("), warning
    private = re.search(r"compiling the kernels in (\S+) instead \(removed at exit\)$", warning)
    assert private and not Path(private[1]).exists(), warning
    assert not cache.is_dir()
