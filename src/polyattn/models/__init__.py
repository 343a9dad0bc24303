"""Whole architectures, one file per family; importing this package registers them all."""

from . import vit  # noqa: F401
