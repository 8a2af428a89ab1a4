import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def published_allocations_dir() -> Path:
    """The published allocation files (never committed here): ../shared/reference/allocations/."""
    path = Path(
        os.environ.get(
            "SCALENET_D2_PUBLISHED_ALLOCATIONS",
            REPO_ROOT.parent / "shared" / "reference" / "allocations",
        )
    )
    if not (path / "scalenet50.json").is_file():
        pytest.skip(f"published allocation files not found in {path}")
    return path
