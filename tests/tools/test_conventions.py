"""What users expect of a command-line tool: --version, a cache they can find
and clear, -q/-v through logging, progress bars only where someone watches,
and a wrong path reported before a missing optional dependency."""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO
from vggen import __version__
from vggen.tools.cache import clear_cache
from vggen.tools.cli import main
from vggen.tools.progress import LOGGER_NAME, configure_logging, progress_bars_enabled, verbosity_level


@pytest.fixture(autouse=True)
def restore_vggen_logger():
    """main() sets the ``vggen`` logger's level and handler; later tests get theirs back."""
    logger = logging.getLogger(LOGGER_NAME)
    level, handlers = logger.level, list(logger.handlers)
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers


def vggen(*args, env=None, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "vggen", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=300)


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


# --------------------------------------------------------------------------- --version


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"vggen {__version__}"


def test_version_from_python_m():
    res = vggen("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"vggen {__version__}"


# --------------------------------------------------------------------------- cache


def test_cache_path_follows_vggen_cache_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VGGEN_CACHE_DIR", str(tmp_path / "mine"))
    assert main(["cache", "path"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'mine'}\n"


def test_cache_clear_removes_only_vggen_libraries(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "shared"
    (cache / "data").mkdir(parents=True)
    sha = "0123456789abcdef" * 4
    ours = [cache / f"{sha}.so", cache / f".{sha}.4242.deadbeef.so"]
    theirs = [cache / "libother.so", cache / "notes.txt", cache / f"{sha}.so.txt",
              cache / "data" / f"{sha}.so", cache / "data" / "cifar-10.tar.gz"]
    for path in ours + theirs:
        path.write_bytes(b"x" * 1024)
    monkeypatch.setenv("VGGEN_CACHE_DIR", str(cache))
    assert main(["cache", "clear"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("removed 2 compiled libraries") and str(cache) in out
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in theirs)


def test_cache_clear_of_a_missing_directory_removes_nothing(tmp_path):
    cleared = clear_cache(tmp_path / "absent")
    assert (cleared.files, cleared.bytes) == (0, 0)
    assert not (tmp_path / "absent").exists()


def test_cache_clear_removes_compiled_ops_and_keeps_datasets(tmp_path):
    op = tmp_path / "ops" / ("a" * 64)
    op.mkdir(parents=True)
    (op / "k.c").write_text("void k(void) {}")
    (tmp_path / "ops" / "by-layer").mkdir()
    (tmp_path / "ops" / "by-layer" / ("b" * 64)).write_text("a" * 64)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cifar.tar.gz").write_text("download")
    cleared = clear_cache(tmp_path)
    assert cleared.ops == 1 and cleared.summary().startswith("removed 0 compiled libraries and 1 compiled op")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


# --------------------------------------------------------------------------- -q / -v


@pytest.mark.parametrize("verbose, quiet, level", [
    (0, 0, logging.INFO), (1, 0, logging.DEBUG), (2, 0, logging.DEBUG),
    (0, 1, logging.WARNING), (0, 2, logging.ERROR), (1, 1, logging.INFO),
])
def test_verbosity_level(verbose, quiet, level):
    assert verbosity_level(verbose, quiet) == level


@pytest.mark.parametrize("argv, debug", [
    (["cache", "path"], False),
    (["-v", "cache", "path"], True),
    (["cache", "path", "-v"], True),          # after the command as well
    (["-q", "cache", "path"], False),
])
def test_verbose_adds_debug_lines_on_stderr_only(argv, debug, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VGGEN_CACHE_DIR", str(tmp_path))
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{tmp_path}\n"             # the result, whatever the verbosity
    assert ("compiled libraries in" in captured.err) == debug


needs_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler")
TINY_TRAINING = ["train", "--target", "c", "--width", "2", "--batch-size", "512"]


@needs_cc
def test_quiet_train_says_nothing(capsys):
    assert main(["-q", *TINY_TRAINING, "--epochs", "1"]) == 0
    assert capsys.readouterr() == ("", "")


def test_warnings_are_prefixed_and_information_is_not(capsys):
    configure_logging(logging.INFO)
    logging.getLogger("vggen.tools.test").info("plain")
    logging.getLogger("vggen.tools.test").warning("careful")
    assert capsys.readouterr().err == "plain\nvggen: warning: careful\n"


# --------------------------------------------------------------------------- progress bars


def test_progress_bars_only_on_a_terminal_without_tqdm_disable(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    configure_logging(logging.INFO)
    assert progress_bars_enabled(FakeTerminal())
    assert not progress_bars_enabled(io.StringIO())                  # a file or a pipe
    for value in ("1", "true", "yes"):
        monkeypatch.setenv("TQDM_DISABLE", value)
        assert not progress_bars_enabled(FakeTerminal())
    for value in ("", "0", "false"):
        monkeypatch.setenv("TQDM_DISABLE", value)
        assert progress_bars_enabled(FakeTerminal())
    configure_logging(logging.WARNING)                                # -q
    assert not progress_bars_enabled(FakeTerminal())


@needs_cc
def test_training_log_file_has_one_line_per_epoch_and_no_bar(tmp_path):
    log = tmp_path / "train.log"
    with log.open("w") as f:
        res = subprocess.run([sys.executable, "-m", "vggen", *TINY_TRAINING, "--epochs", "2"],
                             stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=300)
    text = log.read_text()
    assert res.returncode == 0, text
    assert "\r" not in text and "batch/s" not in text
    lines = text.splitlines()
    assert len(lines) == 3 and lines[0].startswith("training on c"), text
    assert [line.split(":")[0] for line in lines[1:]] == ["epoch 1/2", "epoch 2/2"]
    assert "test accuracy" in lines[2]


# --------------------------------------------------------------------------- optional extras


def test_plot_reports_a_missing_file_before_a_missing_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib → ImportError
    assert main(["plot", str(tmp_path / "absent.jsonl"), "-o", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert "no such metrics file" in err and "matplotlib" not in err


# --------------------------------------------------------------------------- where files are


def test_generated_dir_prefers_env_then_a_built_directory_then_the_shipped_kernels(tmp_path, monkeypatch):
    from vggen import paths

    monkeypatch.delenv("VGGEN_GENERATED", raising=False)
    monkeypatch.chdir(tmp_path)
    assert paths.generated_dir() == paths.shipped_generated()
    (tmp_path / "generated").mkdir()                      # not a build without its manifest
    assert paths.generated_dir() == paths.shipped_generated()
    (tmp_path / "generated" / "manifest.json").write_text("{}")
    assert paths.generated_dir().resolve() == (tmp_path / "generated").resolve()
    monkeypatch.setenv("VGGEN_GENERATED", str(tmp_path / "elsewhere"))
    assert paths.generated_dir() == tmp_path / "elsewhere"


def test_an_installed_package_uses_its_own_copies(tmp_path, monkeypatch):
    """Installed from a wheel there is no checkout above the package: the
    templates and kernels are the ones packaged inside it."""
    from vggen import paths

    package = tmp_path / "site-packages" / "vggen"
    package.mkdir(parents=True)
    monkeypatch.setattr(paths, "PACKAGE", package)
    assert paths.templates_dir() == package / "_templates"
    assert paths.shipped_generated() == package / "_generated"


@pytest.mark.parametrize("env, argv, expected", [
    ({}, ["build"], "generated"),
    ({"VGGEN_GENERATED": "kernels"}, ["build"], "kernels"),
    ({"VGGEN_GENERATED": "kernels"}, ["build", "--out", "mine"], "mine"),
    ({"VGGEN_GENERATED": "kernels"}, ["build", "--check"], "kernels"),
])
def test_build_writes_where_the_runtime_reads(env, argv, expected, monkeypatch, capsys):
    import vggen.compiler.emit as emit

    monkeypatch.delenv("VGGEN_GENERATED", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    seen = []
    monkeypatch.setattr(emit, "build", lambda out, check=False: seen.append(out) or [])
    assert main(argv) == 0
    assert seen == [expected]
    capsys.readouterr()
