from pathlib import Path

import pytest
import yaml

from berth.core.config import load_config
from berth.pretrain.config import PretrainConfig
from berth.tokenizer.config import TokenizerJobConfig

CONFIGS = Path("configs")


@pytest.mark.parametrize("path", sorted((CONFIGS / "pretrain").glob("*.yaml")), ids=str)
def test_pretrain_configs_load(path):
    cfg = load_config(PretrainConfig, path)
    assert cfg.output_dir.startswith("runs/")
    assert Path(cfg.tokenizer.config).is_file()


@pytest.mark.parametrize("path", sorted((CONFIGS / "tokenizer").glob("*.yaml")), ids=str)
def test_tokenizer_configs_load(path):
    assert load_config(TokenizerJobConfig, path).tokenizer.vocab_size > 1000


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=str)
def test_accelerate_configs_are_accelerate_configs(path):
    from accelerate.commands.config.config_args import ClusterConfig

    data = yaml.safe_load(path.read_text())
    assert data["mixed_precision"] == "no"  # precision comes from train.precision
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes >= 2
