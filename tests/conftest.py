"""Fixtures shared by the tests."""

import pytest
import torch
from astrea_testing import TINY

from modeling_astrea import AstreaConfig, AstreaForConditionalGeneration


@pytest.fixture
def tiny_config() -> AstreaConfig:
    return AstreaConfig.from_pretrained(TINY)


@pytest.fixture
def tiny_model(tiny_config) -> AstreaForConditionalGeneration:
    torch.manual_seed(0)
    return AstreaForConditionalGeneration(tiny_config).eval()
