"""setuptools entry: builds the cffi extension against the system OpenSSL.

The wheel carries the compiled extension and the Python package only: the C
sources (pyproject's exclude-package-data) and the build tools beside them
(build.py, stubgen.py, dropped here) stay in the sdist.
"""

from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py

BUILD_TOOLS = {("anyio_asyncssl._native", "build"), ("anyio_asyncssl._native", "stubgen")}


class BuildPyWithoutTools(build_py):
    def find_package_modules(self, package: str, package_dir: str) -> Any:
        return [m for m in super().find_package_modules(package, package_dir)
                if (m[0], m[1]) not in BUILD_TOOLS]


setup(cffi_modules=["src/anyio_asyncssl/_native/build.py:ffibuilder"],
      cmdclass={"build_py": BuildPyWithoutTools})
