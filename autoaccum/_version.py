"""The package version (imported by modules that record it, without importing the package)."""

__version__ = "0.2.0"
