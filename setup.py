# setuptools reads cffi's build hook only from setup(); everything else is in
# pyproject.toml.
from setuptools import setup

setup(cffi_modules=["cffi_build/vhost_build.py:ffibuilder"])
