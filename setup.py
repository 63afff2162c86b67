"""Package list for setuptools.

The top-level ``kernels/`` folder is installed as the subpackage ``momkit.kernels``; there is no
top-level ``kernels`` import name (a package of that name exists on the package index and other
libraries import it). Everything else lives in pyproject.toml.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["momkit", "momkit.*"])
packages += ["momkit.kernels"] + ["momkit.kernels." + p for p in find_packages("kernels")]
package_dir = {"momkit": "momkit", "momkit.kernels": "kernels"}

setup(packages=packages, package_dir=package_dir)
