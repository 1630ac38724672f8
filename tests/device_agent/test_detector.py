"""The detector on the real YOLOv8n models in ../shared, checked against the reference decode."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from device_agent.detector import Detection, Detector, DetectParams
from fleet_protocol.onnx_model import ModelLoadError, SessionOptions, resolve_providers
from tests.device_agent import model_edits

# ../shared/MANIFEST.md: int8 model, letterbox 640, conf 0.25, class-wise NMS IoU 0.45.
BUS_INT8 = [
    ("person", 0.899, (50, 398, 244, 903)),
    ("person", 0.896, (221, 408, 343, 856)),
    ("person", 0.890, (672, 372, 810, 879)),
    ("bus", 0.822, (34, 231, 800, 766)),
    ("person", 0.312, (0, 562, 56, 868)),
]
ZIDANE_INT8 = [
    ("person", 0.862, (109, 197, 1113, 711)),
    ("person", 0.862, (751, 45, 1126, 708)),
    ("tie", 0.316, (434, 436, 524, 714)),
]


def assert_matches(found: list[Detection], expected: list[tuple[str, float, tuple[int, ...]]]) -> None:
    assert len(found) == len(expected), [d.to_dict() for d in found]
    unmatched = list(found)
    for label, score, box in expected:
        match = next(
            (
                d
                for d in unmatched
                if d.label == label
                and abs(d.confidence - score) <= 0.005
                and max(abs(a - b) for a, b in zip(d.bbox, box, strict=True)) <= 2
            ),
            None,
        )
        assert match is not None, (
            f"no detection matches {label} {score} {box} in {[d.to_dict() for d in found]}"
        )
        unmatched.remove(match)


@pytest.fixture(scope="module")
def bus(bus_jpg: Path) -> np.ndarray:
    return cv2.imread(str(bus_jpg))


def test_int8_matches_reference_on_bus(int8_detector: Detector, bus: np.ndarray) -> None:
    assert_matches(int8_detector.detect(bus), BUS_INT8)


def test_int8_matches_reference_on_zidane(int8_detector: Detector, zidane_jpg: Path) -> None:
    assert_matches(int8_detector.detect(cv2.imread(str(zidane_jpg))), ZIDANE_INT8)


def test_fp32_gives_the_same_classes(fp32_detector: Detector, bus: np.ndarray) -> None:
    found = fp32_detector.detect(bus)
    assert sorted(d.label for d in found) == sorted(label for label, _, _ in BUS_INT8)
    for det in found:
        nearest = min(
            BUS_INT8, key=lambda ref: sum(abs(a - b) for a, b in zip(det.bbox, ref[2], strict=True))
        )
        assert det.label == nearest[0]
        assert max(abs(a - b) for a, b in zip(det.bbox, nearest[2], strict=True)) <= 15


def test_metadata_gives_names_size_and_stride(int8_detector: Detector) -> None:
    assert len(int8_detector.names) == 80
    assert int8_detector.names[0] == "person"
    assert int8_detector.names[79] == "toothbrush"
    assert (int8_detector.spec.input_height, int8_detector.spec.input_width) == (640, 640)
    assert int8_detector.spec.stride == 32
    assert "CPUExecutionProvider" in int8_detector.providers


def test_boxes_are_clipped_to_the_image(int8_detector: Detector, bus: np.ndarray) -> None:
    height, width = bus.shape[:2]
    for det in int8_detector.detect(bus, DetectParams(conf=0.01)):
        x1, y1, x2, y2 = det.bbox
        assert 0 <= x1 <= x2 <= width
        assert 0 <= y1 <= y2 <= height


def test_class_filter_and_max_det(int8_detector: Detector, bus: np.ndarray) -> None:
    only_bus = int8_detector.detect(bus, DetectParams(classes=int8_detector.class_ids(["bus"])))
    assert [d.label for d in only_bus] == ["bus"]
    top_two = int8_detector.detect(bus, DetectParams(max_det=2))
    assert [round(d.confidence, 3) for d in top_two] == [0.899, 0.896]
    assert int8_detector.class_ids(["person", "5"]) == frozenset({0, 5})
    with pytest.raises(ValueError, match="unknown class 'unicorn'"):
        int8_detector.class_ids(["unicorn"])


def test_timings_and_sizes_are_reported(int8_detector: Detector, bus: np.ndarray) -> None:
    result = int8_detector.run(bus)
    assert (result.width, result.height) == (810, 1080)
    assert result.timing.infer_ms > result.timing.post_ms > 0
    assert result.timing.pre_ms > 0


def test_grayscale_and_alpha_images_are_accepted(int8_detector: Detector, bus: np.ndarray) -> None:
    gray = cv2.cvtColor(bus, cv2.COLOR_BGR2GRAY)
    bgra = cv2.cvtColor(bus, cv2.COLOR_BGR2BGRA)
    assert "bus" in {d.label for d in int8_detector.detect(gray)}
    assert_matches(int8_detector.detect(bgra), BUS_INT8)


def test_tiny_and_wide_images(int8_detector: Detector) -> None:
    for shape in [(1, 1, 3), (4, 3000, 3), (3000, 4, 3)]:
        assert int8_detector.run(np.zeros(shape, np.uint8)).detections == []


def test_run_batch_equals_single_runs(int8_detector: Detector, bus: np.ndarray, zidane_jpg: Path) -> None:
    zidane = cv2.imread(str(zidane_jpg))
    batch = int8_detector.run_batch([bus, zidane])
    assert [r.detections for r in batch] == [int8_detector.detect(bus), int8_detector.detect(zidane)]


def test_channels_last_output_layout(
    fp32_model: Path, fp32_detector: Detector, bus: np.ndarray, tmp_path: Path
) -> None:
    transposed = Detector(model_edits.transposed_output_model(fp32_model, tmp_path / "t.onnx"))
    assert transposed.spec.channels_first_output is False
    assert transposed.detect(bus) == fp32_detector.detect(bus)


def test_fp16_model_gets_fp16_input(
    fp32_model: Path, fp32_detector: Detector, bus: np.ndarray, tmp_path: Path
) -> None:
    half = Detector(model_edits.fp16_model(fp32_model, tmp_path / "half.onnx"))
    tensor, _ = half.preprocess(bus)
    assert tensor.dtype == np.float16
    found = half.detect(bus)
    assert sorted(d.label for d in found) == sorted(d.label for d in fp32_detector.detect(bus))


def test_names_file_when_metadata_is_missing(int8_model: Path, coco128_yaml: Path, tmp_path: Path) -> None:
    bare = model_edits.without_metadata(int8_model, tmp_path / "bare.onnx")
    unnamed = Detector(bare, warmup=False)
    assert unnamed.names[:2] == ["0", "1"]
    assert len(unnamed.names) == 80
    named = Detector(bare, names_file=coco128_yaml, warmup=False)
    assert named.names[5] == "bus"
    names_txt = tmp_path / "names.txt"
    names_txt.write_text("\n".join(named.names) + "\n")
    assert Detector(bare, names_file=names_txt, warmup=False).names == named.names


def test_broken_model_files_raise_a_clear_error(tmp_path: Path, shared: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        Detector(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x01 this is not a protobuf")
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load"):
        Detector(junk)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes((shared / "models" / "yolov8n_int8.onnx").read_bytes()[:100_000])
    with pytest.raises(ModelLoadError):
        Detector(truncated)
    with pytest.raises(ModelLoadError, match="YOLO detector outputs"):
        Detector(shared / "models" / "mobilenetv2-12-int8.onnx")


def test_provider_choice() -> None:
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(None, available) == available
    assert resolve_providers(None, ["CPUExecutionProvider", "TensorrtExecutionProvider"]) == [
        "TensorrtExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert resolve_providers(["cpu"], available) == ["CPUExecutionProvider"]
    assert resolve_providers(["cuda"], available) == available
    with pytest.raises(ModelLoadError, match="none of the requested execution providers"):
        resolve_providers(["tensorrt"], ["CPUExecutionProvider"])


def test_thread_settings_are_applied(int8_model: Path, bus: np.ndarray) -> None:
    single = Detector(int8_model, session_options=SessionOptions(providers=["cpu"], intra_op_threads=1))
    assert_matches(single.detect(bus), BUS_INT8)
    assert single.providers == ("CPUExecutionProvider",)


def test_bad_params_are_refused() -> None:
    with pytest.raises(ValueError, match="conf"):
        DetectParams(conf=1.5)
    with pytest.raises(ValueError, match="max_det"):
        DetectParams(max_det=0)
