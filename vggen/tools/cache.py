"""``vggen cache path|clear``: the directory of compiled kernel libraries.

The cache (:func:`vggen.paths.cache_dir`) may be a directory the user shares
with other programs (``VGGEN_CACHE_DIR=/tmp``), so ``clear`` removes only the
files vggen names itself (:mod:`vggen.runtime.c`): the compiled libraries
``<sha256>.so``, their records ``<sha256>.json``, and the temporary
``.<sha256>.<pid>.<hex>.so`` and ``.<sha256>.<pid>.<hex>.json`` a compile
writes first (a killed one leaves them): clear between builds, since a build
running meanwhile may lose its files.  It also removes ``ops/``, the layers
``vggen.compile`` emitted (:mod:`vggen.ops`: every name in it is vggen's).
The datasets under
``data/`` are kept: they are downloads, not a cache that rebuilds itself in
seconds.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from vggen.errors import VggenError
from vggen.paths import cache_dir

# runtime.c names a library by the SHA-256 of its inputs, and its record
# after it; it writes both under a hidden temporary name first.  (Not imported
# from there: runtime.c loads NumPy and SymPy, slow for `vggen cache clear`.)
LIBRARY = re.compile(r"\.?[0-9a-f]{64}(\.\d+\.[0-9a-f]+)?\.so")
RECORD = re.compile(r"\.?[0-9a-f]{64}(\.\d+\.[0-9a-f]+)?\.json")


@dataclass
class Cleared:
    directory: Path
    files: int
    bytes: int
    ops: int = 0             # compiled ops (vggen.compile) removed

    def summary(self) -> str:
        ops = f" and {self.ops} compiled op{'' if self.ops == 1 else 's'}" if self.ops else ""
        return (f"removed {self.files} compiled librar{'y' if self.files == 1 else 'ies'}{ops} "
                f"({self.bytes / 2**20:.1f} MiB) from {self.directory}")


def clear_cache(directory: Path | None = None) -> Cleared:
    """Remove vggen's compiled libraries and their records from ``directory``
    (default: the cache); ``files`` counts the libraries, ``bytes`` everything."""
    directory = Path(directory) if directory is not None else cache_dir()
    files = size = 0
    if not directory.is_dir():
        return Cleared(directory, 0, 0)
    for path in sorted(directory.iterdir()):
        library = LIBRARY.fullmatch(path.name)
        if not ((library or RECORD.fullmatch(path.name)) and path.is_file() and not path.is_symlink()):
            continue
        try:
            length = path.stat().st_size
            path.unlink()
        except FileNotFoundError:          # removed by a concurrent clear
            continue
        except OSError as e:
            raise VggenError(f"cannot remove {path}: {e.strerror}") from None
        if library:
            files += 1
        size += length
    ops, ops_bytes = _clear_ops(directory / OPS)
    return Cleared(directory, files, size + ops_bytes, ops)


OPS = "ops"      # vggen.ops.OPS (not imported: vggen.ops loads SymPy)


def _clear_ops(ops: Path) -> tuple[int, int]:
    """Remove ``ops/`` whole: (op directories, bytes)."""
    if not ops.is_dir() or ops.is_symlink():
        return 0, 0
    count = sum(1 for p in ops.iterdir() if p.is_dir() and not p.name.startswith(".")
                and p.name != "by-layer")
    size = sum(f.stat().st_size for f in ops.rglob("*") if f.is_file() and not f.is_symlink())
    try:
        shutil.rmtree(ops)
    except OSError as e:
        raise VggenError(f"cannot remove {ops}: {e.strerror or e}") from None
    return count, size
