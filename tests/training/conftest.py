"""Fixtures the training tests share."""

import pytest


@pytest.fixture(scope="session")
def feature_cache_dir(tmp_path_factory):
    """One expert feature cache for the session's micro recipes: entries are keyed by the experts' weights and the
    image's content, so runs with the same seed reuse them instead of running the experts again."""
    return tmp_path_factory.mktemp("feature-cache")
