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


SKIPPED_DIRS = {".git", ".venv", ".venv-serve", "__pycache__", ".pytest_cache", ".ruff_cache"}


def repository_files() -> dict[str, int]:
    """Every file of the checkout (environments, caches and git's own files aside) with its modification time."""
    import os

    from astrea_testing import REPO

    files = {}
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, REPO)] = os.stat(path, follow_symlinks=False).st_mtime_ns
    return files


@pytest.fixture(scope="session", autouse=True)
def tests_write_only_to_temporary_folders():
    """The suite fails (at its end) if any test created, changed or removed a file in the checkout, `outputs/`
    included: tests write to pytest's temporary folders only."""
    before = repository_files()
    yield
    after = repository_files()
    touched = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    assert not touched, f"tests wrote into the repository: {touched[:20]}"
