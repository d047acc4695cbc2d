"""The installed version, read once from the package metadata."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gradwatch")
except PackageNotFoundError:  # running from a source checkout that is not installed
    __version__ = "0.0.0+source"
