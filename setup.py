"""Package layout (everything else is in pyproject.toml).

The repository keeps its top-level folders (coordinator/, site_agent/, models/, simulations/),
but they install under the one import root ``cleanroom``: ``cleanroom.coordinator`` is the
folder coordinator/, and so on. A consortium's own app may then hold a models.py or a
coordinator.py without shadowing ours.
"""

from setuptools import find_packages, setup

SIDES = ("coordinator", "site_agent", "models", "simulations")

package_dir = {"cleanroom": "cleanroom"}
packages = ["cleanroom", *(f"cleanroom.{p}" for p in find_packages("cleanroom"))]
for side in SIDES:
    package_dir[f"cleanroom.{side}"] = side
    packages += [f"cleanroom.{side}", *(f"cleanroom.{side}.{p}" for p in find_packages(side))]

setup(packages=packages, package_dir=package_dir)
