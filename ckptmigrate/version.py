"""The one place the version is written (pyproject.toml reads it): recording it in every envelope
costs nothing, where importlib.metadata would scan site-packages on every write."""

__version__ = "0.1.0"
