"""The accelerate configs in configs/ load with accelerate's own parser."""

from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

CONFIGS = sorted((REPO_ROOT / "configs" / "accelerate").glob("*.yaml"))


def test_the_three_scale_up_configs_are_shipped():
    assert {p.stem for p in CONFIGS} == {"ddp", "fsdp", "deepspeed_zero3"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads(path: Path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero3": "DEEPSPEED"}[path.stem]
    assert str(config.distributed_type).endswith(expected)
    assert config.mixed_precision == "bf16" and config.num_machines == 1
    if path.stem == "deepspeed_zero3":
        assert config.deepspeed_config["zero_stage"] == 3
    if path.stem == "fsdp":
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
