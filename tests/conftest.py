"""Shared fixtures: the real data in ../shared/data, and a throwaway MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest

from moetuner import PROJECT_ROOT

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def shared_data_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with a reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real routing data {path} is absent (a user's clone has no ../shared); "
                    f"this test runs where ../shared/data exists")
    return path


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (skips when absent)."""
    return shared_data_path()


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh sqlite MLflow store for this test, exported as MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
