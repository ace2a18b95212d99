import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def repo_root():
    return REPO


@pytest.fixture
def small_cfg():
    # 16 MiB of L1, small chunks, no huge pages: fast to set up in tests.
    return {"chunk_size": 16, "max_local_cpu_size": 0.015625, "local_cpu_huge_pages": False}
