"""Shared fixtures: tiny model configs and paths to the reference material in ../shared."""
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "reference"
GOLDENS = SHARED / "goldens"
UPSTREAM_TOKENIZER = SHARED / "upstream_tokenizer"

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny_config(**overrides):
    from model.model_minimind import MiniMindConfig
    return MiniMindConfig(**{**TINY, **overrides})


@pytest.fixture
def tiny_model():
    """A seeded tiny dense model in eval mode."""
    from model.model_minimind import MiniMindForCausalLM
    torch.manual_seed(0)
    return MiniMindForCausalLM(tiny_config()).eval()


def needs(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not present")
