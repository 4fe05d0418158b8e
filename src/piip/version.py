"""The package version (one place; the checkpoint writer records it)."""
__version__ = "0.1.0"
