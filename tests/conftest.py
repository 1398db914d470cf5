"""Test-wide settings: remembered model hashes (file_hashes.py) go to a temporary folder, not the user's cache."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _hash_cache_in_a_temporary_folder(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield
