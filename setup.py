"""Package layout the declarative configuration cannot express.

The repository keeps ``templates/`` and ``generated/`` at the top, where
they are edited and reviewed; a wheel ships them inside the package as
``vggen._templates`` and ``vggen._generated`` (``vggen.paths`` looks there
when no checkout is around).  Everything else is in pyproject.toml.
"""

import os

from setuptools import find_packages, setup

SHIPPED = {"vggen._templates": "templates", "vggen._generated": "generated"}


def shipped_packages() -> dict[str, str]:
    """Each shipped directory and its subdirectories as packages, so that their
    files are package data of the directory that holds them."""
    packages = {}
    for package, top in SHIPPED.items():
        for folder, subfolders, _ in os.walk(top):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith((".", "__")))
            relative = os.path.relpath(folder, top)
            name = package if relative == "." else package + "." + relative.replace(os.sep, ".")
            packages[name] = folder
    return packages


shipped = shipped_packages()
setup(
    packages=find_packages(include=["vggen", "vggen.*"]) + list(shipped),
    package_dir=shipped,
    package_data={name: ["*"] for name in shipped},
)
