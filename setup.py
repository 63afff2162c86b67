"""Package list for setuptools.

The top-level ``kernels/`` folder is installed as the subpackage ``momkit.kernels``; there is no
top-level ``kernels`` import name (a package of that name exists on the package index and other
libraries import it). ``momkit/configs`` holds only YAML files (package data), so it is listed by hand.
Everything else lives in pyproject.toml.
"""

import warnings

from setuptools import find_packages, setup
from setuptools.warnings import InformationOnly

packages = [*find_packages(include=["momkit", "momkit.*"]), "momkit.configs"]
packages += ["momkit.kernels"] + ["momkit.kernels." + p for p in find_packages("kernels")]
package_dir = {"momkit": "momkit", "momkit.kernels": "kernels"}

# Because of that mapping, an editable install imports momkit through a meta path finder (which is what keeps
# `kernels` from becoming a top-level name); setuptools says so in a note printed as a warning on every
# `pip install -e .`. The note asks for nothing, so it is not shown.
warnings.filterwarnings("ignore", message="Editable installation", category=InformationOnly)

setup(packages=packages, package_dir=package_dir)
