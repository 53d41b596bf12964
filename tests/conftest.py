"""Fixtures shared by the tests."""

import pytest
import torch
from astrea_testing import TINY, save_random_tiny

from modeling_astrea import AstreaConfig, AstreaForConditionalGeneration


@pytest.fixture
def tiny_config() -> AstreaConfig:
    return AstreaConfig.from_pretrained(TINY)


@pytest.fixture
def tiny_model(tiny_config) -> AstreaForConditionalGeneration:
    torch.manual_seed(0)
    return AstreaForConditionalGeneration(tiny_config).eval()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A seeded random tiny Astrea with the shipped processor, saved once per session; tests only read it (a test
    that changes a model folder saves its own)."""
    return save_random_tiny(tmp_path_factory.mktemp("tiny-random"))
