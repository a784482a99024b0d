"""The optional compiled fast paths: each ``ckptmigrate/formats/_*.c`` file is the C extension
module of its name. Optional: where one does not build, the pure-Python path it speeds up runs
instead, with the same results (``ckptmigrate.formats.native``). Everything else is in
pyproject.toml."""

from pathlib import Path

from setuptools import Extension, setup

setup(ext_modules=[
    Extension(f"ckptmigrate.formats.{source.stem}", [source.as_posix()], optional=True)
    for source in sorted(Path("ckptmigrate/formats").glob("_*.c"))
])
