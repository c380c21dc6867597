"""What stages share: params, io, logging, DVCLive, models, chat rendering, ConvoKit reading."""

from stages.lib.errors import StageError, run_stage

__all__ = ["StageError", "run_stage"]
