"""The few helpers every stage shares: params, io, logging, DVCLive, models."""

from stages.lib.errors import StageError, run_stage

__all__ = ["StageError", "run_stage"]
