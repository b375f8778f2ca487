"""Package layout only (metadata and package data live in pyproject.toml).

The repository's top-level configs/, the one copy people read and edit, is installed inside the package as
`rrjax/configs` (rrjax.gin_config finds it there). Every folder is listed as a package, data folders too,
so that setuptools installs their files without warning that it would ignore them.
"""

from setuptools import find_namespace_packages, setup


def tree(name: str, where: str) -> list[str]:
  return [name] + [f"{name}.{p}" for p in find_namespace_packages(where=where, exclude=["*__pycache__*"])]


setup(
    packages=tree("rrjax", "rrjax") + tree("rrjax.configs", "configs"),
    package_dir={"rrjax.configs": "configs"},
)
