"""`edgefleet detect` and `edgefleet eval` as a user runs them: the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2

EDGEFLEET = str(Path(sys.executable).with_name("edgefleet"))


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGEFLEET, *map(str, args)], capture_output=True, text=True, timeout=300, check=False
    )


def test_detect_jsonl_prints_one_object_per_image_and_reports_bad_files(
    int8_model: Path, bus_jpg: Path, zidane_jpg: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(bus_jpg, images / "a_bus.jpg")
    shutil.copy(zidane_jpg, images / "b_zidane.jpg")
    (images / "c_broken.jpg").write_bytes(bus_jpg.read_bytes()[:200])
    (images / "notes.txt").write_text("not an image, and not picked up from a directory")
    missing = tmp_path / "missing.png"

    result = run_cli(
        "detect", images, missing, "--model", int8_model, "--format", "jsonl", "--save", tmp_path / "out"
    )

    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    bus, zidane = (json.loads(line) for line in lines)
    assert bus["image"] == str(images / "a_bus.jpg")
    assert (bus["width"], bus["height"]) == (810, 1080)
    assert sorted(d["label"] for d in bus["detections"]) == ["bus", "person", "person", "person", "person"]
    assert set(bus["detections"][0]) == {"class_id", "label", "confidence", "bbox"}
    assert set(bus["timing_ms"]) == {"pre", "infer", "post"}
    assert [d["label"] for d in zidane["detections"]] == ["person", "person", "tie"]
    assert "c_broken.jpg" in result.stderr
    assert "missing.png" in result.stderr
    assert "2 image(s) could not be read" in result.stderr
    saved = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert saved == ["a_bus.jpg", "b_zidane.jpg"]
    annotated = cv2.imread(str(tmp_path / "out" / "a_bus.jpg"))
    assert annotated.shape == (1080, 810, 3)
    assert (annotated != cv2.imread(str(bus_jpg))).any()


def test_detect_table_with_class_filter(int8_model: Path, bus_jpg: Path) -> None:
    result = run_cli("detect", bus_jpg, "--model", int8_model, "--classes", "bus", "--conf", "0.5")
    assert result.returncode == 0, result.stderr
    assert "bus" in result.stdout
    assert "person" not in result.stdout


def test_detect_explains_bad_arguments(int8_model: Path, bus_jpg: Path, tmp_path: Path) -> None:
    unknown_class = run_cli("detect", bus_jpg, "--model", int8_model, "--classes", "unicorn")
    assert unknown_class.returncode == 2
    assert "unknown class 'unicorn'" in unknown_class.stderr
    missing_model = run_cli("detect", bus_jpg, "--model", tmp_path / "nope.onnx")
    assert missing_model.returncode == 2
    assert "model file not found" in missing_model.stderr
    assert "models/README.md" in missing_model.stderr


def test_eval_prints_a_table_and_writes_json(int8_model: Path, coco128_yaml: Path, tmp_path: Path) -> None:
    images = sorted((coco128_yaml.parent / "images" / "train2017").glob("*.jpg"))[:6]
    (tmp_path / "subset.txt").write_text("".join(f"{p}\n" for p in images))
    data = tmp_path / "subset.yaml"
    data.write_text(
        f"path: {tmp_path}\nval: subset.txt\nnames: {coco128_yaml.read_text().split('names:')[1]}"
    )
    report_path = tmp_path / "report.json"

    result = run_cli("eval", "--model", int8_model, "--data", data, "--json", report_path)

    assert result.returncode == 0, result.stderr
    assert "AP50-95" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["images"] == 6
    assert 0.0 < report["map50_95"] <= report["map50"] <= 1.0
    assert f"{report['map50_95']:.4f}" in result.stdout
    assert report["settings"]["conf"] == 0.001
    assert report["settings"]["iou"] == 0.7


def test_eval_explains_a_missing_data_file(int8_model: Path, tmp_path: Path) -> None:
    result = run_cli("eval", "--model", int8_model, "--data", tmp_path / "nope.yaml")
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr
