"""One real MLflow store (SQLite backend + local artifact folder) for the whole test session.

Creating an MLflow SQLite database runs its migrations, which takes seconds; every test that needs MLflow
shares this one and keeps apart by model, experiment or run names of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class MlflowStore:
    """Where the session's MLflow store lives."""

    root: Path
    tracking_uri: str
    artifact_root: Path


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> MlflowStore:
    root = tmp_path_factory.mktemp("mlflow")
    artifacts = root / "artifacts"
    artifacts.mkdir()
    return MlflowStore(root=root, tracking_uri=f"sqlite:///{root / 'mlflow.db'}", artifact_root=artifacts)
