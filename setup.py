"""setuptools entry: builds the cffi extension against the system OpenSSL."""

from setuptools import setup

setup(cffi_modules=["src/anyio_asyncssl/_native/build.py:ffibuilder"])
