"""Session-wide fixtures: the real models and data in ../shared, and one loaded detector per model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One private Mosquitto per test session (`mqtt_broker`), or per test (`private_broker`); one MLflow store.
pytest_plugins = ["tests.broker", "tests.mlflow_store"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The shared models and data beside the checkout (`../shared`), or `EDGEFLEET_SHARED`."""
    path = Path(os.environ.get("EDGEFLEET_SHARED", REPO_ROOT.parent / "shared"))
    if not (path / "models").is_dir():
        # Fail loudly, never skip: CI must not turn green because the real models are missing.
        pytest.fail(f"the shared models and data are missing: expected {path}/models (set EDGEFLEET_SHARED)")
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    return shared_dir()


@pytest.fixture(scope="session")
def int8_model(shared: Path) -> Path:
    return shared / "models" / "yolov8n_int8.onnx"


@pytest.fixture(scope="session")
def fp32_model(shared: Path) -> Path:
    return shared / "models" / "yolov8n.onnx"


@pytest.fixture(scope="session")
def bus_jpg(shared: Path) -> Path:
    return shared / "data" / "images" / "bus.jpg"


@pytest.fixture(scope="session")
def zidane_jpg(shared: Path) -> Path:
    return shared / "data" / "images" / "zidane.jpg"


@pytest.fixture(scope="session")
def coco128_yaml(shared: Path) -> Path:
    return shared / "data" / "coco128" / "coco128.yaml"


@pytest.fixture(scope="session")
def int8_detector(int8_model: Path):  # type: ignore[no-untyped-def]
    """One loaded int8 detector shared by every test of the session (loading costs ~0.5 s)."""
    from device_agent.detector import Detector

    return Detector(int8_model)


@pytest.fixture(scope="session")
def fp32_detector(fp32_model: Path):  # type: ignore[no-untyped-def]
    from device_agent.detector import Detector

    return Detector(fp32_model)
