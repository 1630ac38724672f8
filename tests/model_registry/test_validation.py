"""What the registry accepts and refuses, on the real models and on edited copies of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_registry.validation import ModelValidationError, class_names_digest, validate_model
from tests.device_agent.model_edits import transposed_output_model
from tests.model_registry.model_edits import cut_rows_model, dangling_input_model, four_d_output_model

COCO_FIRST = ["person", "bicycle", "car"]


def test_real_detectors_pass_with_their_facts(fp32_model: Path, int8_model: Path) -> None:
    fp32 = validate_model(fp32_model)
    int8 = validate_model(int8_model)

    assert (fp32.kind, fp32.layout, fp32.precision) == ("detector", "[B,4+nc,N]", "fp32")
    assert int8.precision == "int8"
    assert fp32.input_shape == (1, 3, 640, 640)
    assert fp32.output_shape == (1, 84, 8400)
    assert fp32.class_names[:3] == COCO_FIRST
    assert fp32.num_classes == 80
    # Same label set in both files, so the same digest; it is the digest of the names list itself.
    assert fp32.class_names_digest == int8.class_names_digest == class_names_digest(fp32.class_names)
    assert fp32.opset == 20
    assert fp32.producer == "onnx.quantize 0.1.0"
    assert fp32.size == fp32_model.stat().st_size
    tags = fp32.tags()
    assert json.loads(tags["input_shape"]) == [1, 3, 640, 640]
    assert tags["sha256"] == fp32.sha256
    assert len(fp32.sha256) == 64


def test_a_classifier_without_names_gets_index_names(shared: Path) -> None:
    facts = validate_model(shared / "models" / "mobilenetv2-12-int8.onnx")

    assert (facts.kind, facts.layout, facts.num_classes) == ("classifier", "[B,C]", 1000)
    assert facts.input_shape == ("batch_size", 3, 224, 224)
    assert facts.names_in_metadata is False
    assert facts.class_names_digest == class_names_digest([str(i) for i in range(1000)])


def test_a_transposed_detector_is_understood(int8_model: Path, tmp_path: Path) -> None:
    facts = validate_model(transposed_output_model(int8_model, tmp_path / "transposed.onnx"))

    assert (facts.kind, facts.layout, facts.output_shape) == ("detector", "[B,N,4+nc]", (1, 8400, 84))


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "the file is empty"),
        (b"\x00\xff" * 500 + b"garbage", "not an ONNX model"),
        (b"name: not a model\n" * 20, "ONNX"),
    ],
)
def test_files_that_are_not_models_are_refused(content: bytes, reason: str, tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)

    with pytest.raises(ModelValidationError) as caught:
        validate_model(path)

    assert reason in caught.value.reason
    assert str(path) in str(caught.value)


def test_a_graph_failing_the_checker_is_refused(int8_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelValidationError, match="fails the ONNX checker"):
        validate_model(dangling_input_model(int8_model, tmp_path / "dangling.onnx"))


def test_a_valid_onnx_with_a_four_d_output_is_refused(int8_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelValidationError) as caught:
        validate_model(four_d_output_model(int8_model, tmp_path / "4d.onnx"))

    assert "[1, 1, 84, 8400]" in caught.value.reason
    assert "edgefleet understands YOLO detectors" in caught.value.reason


def test_a_detector_whose_rows_do_not_match_its_names_is_refused(int8_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelValidationError) as caught:
        validate_model(cut_rows_model(int8_model, tmp_path / "cut.onnx", rows=50))

    assert "names 80 classes" in caught.value.reason
    assert "[1, 50, 8400]" in caught.value.reason


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelValidationError, match="file not found"):
        validate_model(tmp_path / "absent.onnx")
