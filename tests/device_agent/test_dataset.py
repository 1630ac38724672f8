"""Reading YOLO-format datasets: the real coco128, layouts a data YAML may use, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_agent.dataset import DatasetError, label_path, load_dataset


def make_dataset(root: Path, labels: dict[str, str], yaml_text: str | None = None) -> Path:
    """A dataset under `root/ds`: an empty `.jpg` per key of `labels`; a label file unless its text is ''."""
    images, label_dir = root / "ds" / "images" / "val", root / "ds" / "labels" / "val"
    images.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    for stem, text in labels.items():
        (images / f"{stem}.jpg").write_bytes(b"")
        if text:
            (label_dir / f"{stem}.txt").write_text(text)
    config = root / "ds" / "data.yaml"
    config.write_text(yaml_text or "path: .\nval: images/val\nnames: [cat, dog]\n")
    return config


def test_coco128_loads_with_its_background_images(coco128_yaml: Path) -> None:
    dataset = load_dataset(coco128_yaml)
    assert len(dataset.images) == 128
    assert dataset.box_count == 929
    assert len(dataset.names) == 80
    assert dataset.names[0] == "person"
    assert dataset.names[79] == "toothbrush"
    background = sorted(image.path.stem for image in dataset.images if len(image.class_ids) == 0)
    assert background == ["000000000250", "000000000508"]
    assert all(image.path.is_file() for image in dataset.images)
    assert dataset.images[0].boxes_cxcywh_norm.dtype == np.float64
    assert dataset.images[0].class_ids.dtype == np.int64


def test_paths_are_relative_to_the_yaml_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_dataset(tmp_path, {"a": "1 0.5 0.5 0.2 0.4\n0 0.25 0.25 0.5 0.5\n", "b": ""})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    dataset = load_dataset(Path("..") / "ds" / "data.yaml")
    assert [image.path.name for image in dataset.images] == ["a.jpg", "b.jpg"]
    assert dataset.names == ["cat", "dog"]
    first = dataset.images[0]
    assert first.class_ids.tolist() == [1, 0]
    assert first.boxes_xyxy(200, 100).tolist() == [[80.0, 30.0, 120.0, 70.0], [0.0, 0.0, 100.0, 50.0]]
    assert dataset.images[1].boxes_xyxy(200, 100).shape == (0, 4)
    assert config.is_file()


def test_names_as_a_dict_and_val_falling_back_to_train(tmp_path: Path) -> None:
    config = make_dataset(
        tmp_path, {"a": "0 0.5 0.5 1 1\n"}, "path: .\ntrain: images/val\nnames:\n  0: cat\n  1: dog\n"
    )
    dataset = load_dataset(config)
    assert dataset.split == "train"
    assert dataset.names == ["cat", "dog"]
    assert dataset.box_count == 1


def test_a_txt_list_of_images_relative_to_the_list(tmp_path: Path) -> None:
    config = make_dataset(tmp_path, {"a": "0 0.5 0.5 1 1\n", "b": "1 0.5 0.5 1 1\n"})
    (config.parent / "val.txt").write_text("./images/val/b.jpg\n\nimages/val/a.jpg\n")
    config.write_text("val: val.txt\nnames: [cat, dog]\n")
    dataset = load_dataset(config)
    assert [(image.path.name, image.class_ids.tolist()) for image in dataset.images] == [
        ("a.jpg", [0]),
        ("b.jpg", [1]),
    ]


def test_polygon_labels_become_their_bounding_box(tmp_path: Path) -> None:
    config = make_dataset(tmp_path, {"a": "0 0.1 0.2 0.5 0.2 0.3 0.6\n"})
    (image,) = load_dataset(config).images
    assert image.boxes_cxcywh_norm[0].tolist() == pytest.approx([0.3, 0.4, 0.4, 0.4])


def test_label_path_replaces_the_last_images_component() -> None:
    image = Path("data") / "images" / "set" / "images" / "x.jpeg"
    assert label_path(image) == Path("data") / "images" / "set" / "labels" / "x.txt"
    assert label_path(Path("flat") / "x.png") == Path("flat") / "x.txt"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0 0.5 0.5 0.2", r"a\.txt:2: expected `class cx cy w h`"),
        ("0 0.5 zero 0.2 0.2", r"a\.txt:2: non-numeric value"),
        ("7 0.5 0.5 0.2 0.2", r"a\.txt:2: class 7 is not an id in 0\.\.1"),
        ("1.5 0.5 0.5 0.2 0.2", r"a\.txt:2: class 1\.5 is not an id"),
        ("0 50 60 20 20", r"a\.txt:2: coordinates must be normalised"),
    ],
)
def test_malformed_label_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    config = make_dataset(tmp_path, {"a": f"0 0.5 0.5 0.1 0.1\n{line}\n"})
    with pytest.raises(DatasetError, match=message):
        load_dataset(config)


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("val: images/val\n", "`names` is missing"),
        ("val: images/val\nnames: {0: cat, 2: dog}\n", "ids 0..1 without gaps"),
        ("names: [cat]\n", "no 'val' split"),
        ("val: images/missing\nnames: [cat]\n", "is not an images folder"),
        ("val: labels/val\nnames: [cat]\n", "lists no images"),
        ("- just\n- a list\n", "expected a mapping"),
        ("val: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_data_yaml_is_explained(tmp_path: Path, yaml_text: str, message: str) -> None:
    config = make_dataset(tmp_path, {"a": "0 0.5 0.5 0.1 0.1\n"}, yaml_text)
    with pytest.raises(DatasetError, match=message):
        load_dataset(config)


def test_missing_yaml_and_listed_image(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="data YAML not found"):
        load_dataset(tmp_path / "nope.yaml")
    config = make_dataset(tmp_path, {})
    (config.parent / "val.txt").write_text("images/val/gone.jpg\n")
    config.write_text("val: val.txt\nnames: [cat]\n")
    with pytest.raises(DatasetError, match=r"val\.txt:1: image .*gone\.jpg not found"):
        load_dataset(config)
