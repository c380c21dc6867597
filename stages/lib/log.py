"""Logging set up once per process; each stage logs its parsed config once at start."""

import dataclasses
import logging
import sys
from typing import Any

import yaml

_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def get_logger(stage: str) -> logging.Logger:
    root = logging.getLogger()
    if not any(getattr(h, "_stage_handler", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler._stage_handler = True
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    return logging.getLogger(stage)


def config_dict(config: Any) -> Any:
    """A plain-data view of a (possibly nested) config for logging and model cards."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if dataclasses.is_dataclass(config):
        return {f.name: config_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [config_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: config_dict(v) for k, v in config.items()}
    if isinstance(config, (str, int, float, bool)) or config is None:
        return config
    return str(config)


def log_config(logger: logging.Logger, section: str, config: Any) -> None:
    text = yaml.safe_dump({section: config_dict(config)}, sort_keys=False, allow_unicode=True)
    logger.info("config\n%s", text.rstrip())
