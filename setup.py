"""Packaging: the service and benchmark folders sit beside fastserve/ in the source tree (design card),
but install under the fastserve namespace (fastserve.services, fastserve.bench), so a wheel adds one
top-level name to site-packages. Metadata lives in pyproject.toml."""

from setuptools import find_packages, setup

MAPPED = {"fastserve.services": "services", "fastserve.bench": "bench"}

packages = find_packages(include=["fastserve", "fastserve.*"])
for name, folder in MAPPED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=MAPPED)
