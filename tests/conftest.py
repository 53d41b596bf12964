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


def pytest_configure(config):
    """Hypothesis keeps its example database and caches under `.hypothesis/` in the working folder; send them to a
    temporary folder instead, so that the tests write nothing into the checkout (see below)."""
    import tempfile

    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(tempfile.mkdtemp(prefix="astrea-hypothesis-"))


#: what the checkout may gain while the tests run: environments (any `.venv*`), caches, git's and setuptools' files
SKIPPED_DIRS = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}


def repository_files(skip: tuple = ()) -> dict[str, int]:
    """Every file of the checkout (see SKIPPED_DIRS; and the folders in `skip`) with its modification time."""
    import os

    from astrea_testing import REPO

    files = {}
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [
            d
            for d in dirs
            if d not in SKIPPED_DIRS
            and not d.startswith(".venv")
            and not d.endswith(".egg-info")
            and os.path.join(root, d) not in skip
        ]
        for name in names:
            path = os.path.join(root, name)
            try:
                files[os.path.relpath(path, REPO)] = os.stat(path, follow_symlinks=False).st_mtime_ns
            except FileNotFoundError:  # removed while we looked (say, by a `make demo` running beside the tests)
                continue
    return files


@pytest.fixture(scope="session", autouse=True)
def tests_write_only_to_temporary_folders(tmp_path_factory):
    """The suite fails (at its end) if any test created, changed or removed a file in the checkout, `outputs/`
    included: tests write to pytest's temporary folders only (which may lie inside the checkout, with TMPDIR or
    --basetemp there)."""
    import tempfile

    skip = (str(tmp_path_factory.getbasetemp()), tempfile.gettempdir())
    before = repository_files(skip)
    yield
    after = repository_files(skip)
    touched = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    assert not touched, f"tests wrote into the repository: {touched[:20]}"
