"""``vggen cache path|clear``: the directory of compiled kernel libraries.

The cache (:func:`vggen.paths.cache_dir`) may be a directory the user shares
with other programs (``VGGEN_CACHE_DIR=/tmp``), so ``clear`` removes only the
files vggen names itself (:mod:`vggen.runtime.c`): the compiled libraries
``<sha256>.so``, their records ``<sha256>.json``, and the temporary
``.<sha256>.<pid>.<hex>.so`` and ``.<sha256>.<pid>.<hex>.json`` a compile
writes first (a killed one leaves them): clear between builds, since a build
running meanwhile may lose its files.  The datasets under
``data/`` are kept: they are downloads, not a cache that rebuilds itself in
seconds.
"""

from __future__ import annotations

import re
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

    def summary(self) -> str:
        return (f"removed {self.files} compiled librar{'y' if self.files == 1 else 'ies'} "
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
    return Cleared(directory, files, size)
