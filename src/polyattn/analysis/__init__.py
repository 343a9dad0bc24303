"""Analyses of trained runs: attention maps and their rank, calibration (behind `polyattn inspect`)."""

from .attention_maps import attention_maps, attention_rank, record_attention_maps
from .inspect_run import inspect_run

__all__ = ["attention_maps", "attention_rank", "inspect_run", "record_attention_maps"]
