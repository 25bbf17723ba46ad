"""The package version (read by the package face, the CLI, stores and reports)."""

__version__ = "0.1.0"
