"""Packaging beyond pyproject.toml: the top-level ``recipes/`` folder (the source of the recipes, kept
beside the package as a picture of the architecture) ships inside the package as ``avcl/recipes``, so
a non-editable install (``pip install .``, a wheel) has them (``avcl.config.recipes_dir``)."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["avcl", "avcl.*"]) + ["avcl.recipes"],
    package_dir={"avcl.recipes": "recipes"},
    package_data={"avcl.recipes": ["*.yaml", "**/*.yaml"]},
)
