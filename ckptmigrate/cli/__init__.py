"""The ``ckptmigrate`` command line: thin click commands over the Python API, one module per group."""

from ckptmigrate.cli.main import main

__all__ = ["main"]
