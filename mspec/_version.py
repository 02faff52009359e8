"""The mspec version (one place; the package metadata in pyproject.toml must agree)."""

__version__ = "0.2.0"
