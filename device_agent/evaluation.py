"""COCO-style detection metrics (the numbers pycocotools' COCOeval gives) and the detector evaluator.

AP per class is the mean, over IoU thresholds 0.50:0.05:0.95, of COCO's 101-point interpolated precision.
Matching is greedy per image and class: predictions by descending score, each taking the best-IoU unmatched
ground-truth box at or above the threshold. mAP is the mean over the classes that have ground truth.
Crowd regions and area ranges are not modelled (YOLO labels have neither).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from device_agent.dataset import DatasetError, LabelledDataset
from device_agent.detector import DetectionResult, Detector, DetectParams

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# Built exactly as pycocotools builds them, so thresholds compare bit for bit (its 0.9 is 0.8999999999999999).
IOU_THRESHOLDS: FloatArray = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1)
RECALL_THRESHOLDS: FloatArray = np.linspace(0.0, 1.0, int(np.round((1.0 - 0.0) / 0.01)) + 1)
# Ultralytics' validation settings: a low threshold so the precision-recall curve reaches high recall.
EVAL_PARAMS = DetectParams(conf=0.001, iou=0.7, max_det=300)
MAX_DETS = 300


class EvaluationError(ValueError):
    """The model and the dataset cannot be compared (for example they share no class names)."""


@dataclass(frozen=True)
class GroundTruth:
    """One image's labelled boxes: `boxes` `[N, 4]` `(x1, y1, x2, y2)` pixels, `class_ids` `[N]`."""

    boxes: FloatArray
    class_ids: IntArray


@dataclass(frozen=True)
class Predictions:
    """One image's detections: `boxes` `[N, 4]` `(x1, y1, x2, y2)` pixels, `class_ids` and `scores` `[N]`."""

    boxes: FloatArray
    class_ids: IntArray
    scores: FloatArray


@dataclass(frozen=True)
class ClassAP:
    class_id: int
    name: str
    instances: int
    ap50: float
    ap50_95: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "class_id": self.class_id,
            "name": self.name,
            "instances": self.instances,
            "ap50": round(self.ap50, 6),
            "ap50_95": round(self.ap50_95, 6),
        }


@dataclass(frozen=True)
class DetectionMetrics:
    """`ap` is `[classes, IoU thresholds]`, NaN for classes without ground truth (left out of mAP)."""

    ap: FloatArray
    instances: IntArray
    names: list[str]
    images: int
    predictions: int

    @property
    def map50(self) -> float:
        return self._mean(self.ap[:, 0])

    @property
    def map50_95(self) -> float:
        return self._mean(self.ap.mean(axis=1))

    @property
    def per_class(self) -> list[ClassAP]:
        """The classes that have ground truth, by class id."""
        return [
            ClassAP(c, self.names[c], int(self.instances[c]), float(self.ap[c, 0]), float(self.ap[c].mean()))
            for c in np.flatnonzero(self.instances > 0).tolist()
        ]

    @staticmethod
    def _mean(values: FloatArray) -> float:
        valid = values[~np.isnan(values)]
        return float(valid.mean()) if valid.size else 0.0


class MapAccumulator:
    """Matches each image's predictions as it comes, then computes AP over all of them."""

    def __init__(self, num_classes: int, max_dets: int = MAX_DETS) -> None:
        self.num_classes = num_classes
        self.max_dets = max_dets
        self.images = 0
        self.predictions = 0
        self._instances = np.zeros(num_classes, np.int64)
        self._scores: list[list[FloatArray]] = [[] for _ in range(num_classes)]
        self._matched: list[list[BoolArray]] = [[] for _ in range(num_classes)]

    def add(self, predictions: Predictions, truth: GroundTruth) -> None:
        """Match one image's predictions to its ground truth, class by class."""
        self._check_ids(predictions.class_ids, "prediction")
        self._check_ids(truth.class_ids, "ground-truth")
        self.images += 1
        self._instances += np.bincount(truth.class_ids, minlength=self.num_classes)
        for class_id in np.unique(predictions.class_ids).tolist():
            in_class = predictions.class_ids == class_id
            # Stable sort as COCOeval's, so equal scores keep their input order.
            order = np.argsort(-predictions.scores[in_class], kind="mergesort")[: self.max_dets]
            boxes, scores = predictions.boxes[in_class][order], predictions.scores[in_class][order]
            truth_boxes = truth.boxes[truth.class_ids == class_id]
            self._scores[class_id].append(scores)
            self._matched[class_id].append(greedy_match(box_iou(boxes, truth_boxes), IOU_THRESHOLDS))
            self.predictions += len(scores)

    def result(self, names: Sequence[str] | None = None) -> DetectionMetrics:
        ap = np.full((self.num_classes, len(IOU_THRESHOLDS)), np.nan)
        for class_id in np.flatnonzero(self._instances > 0).tolist():
            ap[class_id] = self._class_ap(class_id)
        class_names = list(names) if names is not None else [str(i) for i in range(self.num_classes)]
        return DetectionMetrics(ap, self._instances.copy(), class_names, self.images, self.predictions)

    def _class_ap(self, class_id: int) -> FloatArray:
        if not self._scores[class_id]:
            return np.zeros(len(IOU_THRESHOLDS))
        scores = np.concatenate(self._scores[class_id])
        matched = np.concatenate(self._matched[class_id], axis=1)[:, np.argsort(-scores, kind="mergesort")]
        return interpolated_ap(matched, int(self._instances[class_id]))

    def _check_ids(self, class_ids: IntArray, what: str) -> None:
        if class_ids.size and (class_ids.min() < 0 or class_ids.max() >= self.num_classes):
            raise EvaluationError(
                f"{what} class ids must be in 0..{self.num_classes - 1}, got {class_ids.tolist()}"
            )


def compute_map(
    per_image_predictions: Sequence[Predictions],
    per_image_ground_truth: Sequence[GroundTruth],
    num_classes: int,
    names: Sequence[str] | None = None,
) -> DetectionMetrics:
    """COCO mAP of predictions against ground truth, image by image (both sequences in the same order)."""
    if len(per_image_predictions) != len(per_image_ground_truth):
        raise EvaluationError(
            f"{len(per_image_predictions)} images of predictions "
            f"but {len(per_image_ground_truth)} images of ground truth"
        )
    accumulator = MapAccumulator(num_classes)
    for predictions, truth in zip(per_image_predictions, per_image_ground_truth, strict=True):
        accumulator.add(predictions, truth)
    return accumulator.result(names)


def box_iou(boxes_a: FloatArray, boxes_b: FloatArray) -> FloatArray:
    """IoU matrix `[len(a), len(b)]` of `(x1, y1, x2, y2)` boxes."""
    top_left = np.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = np.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    intersection = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    area_a = (boxes_a[:, 2] - boxes_a[:, 0]) * (boxes_a[:, 3] - boxes_a[:, 1])
    area_b = (boxes_b[:, 2] - boxes_b[:, 0]) * (boxes_b[:, 3] - boxes_b[:, 1])
    union = area_a[:, None] + area_b[None, :] - intersection
    iou: FloatArray = np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)
    return iou


def greedy_match(iou: FloatArray, thresholds: FloatArray) -> BoolArray:
    """`[thresholds, predictions]`: whether each prediction (`iou` rows, best score first) is a true positive.

    Each prediction takes the unmatched ground-truth box of highest IoU at or above the threshold; on a tie
    the later box wins, as in COCOeval.
    """
    predictions, boxes = iou.shape
    matched = np.zeros((len(thresholds), predictions), dtype=bool)
    if boxes == 0:
        return matched
    taken = np.zeros((len(thresholds), boxes), dtype=bool)
    rows = np.arange(len(thresholds))
    # Only predictions that overlap some box enough can ever match; at low conf that is a small minority.
    for index in np.flatnonzero(iou.max(axis=1) >= thresholds.min()).tolist():
        eligible = (iou[index][None, :] >= thresholds[:, None]) & ~taken
        candidate_iou = np.where(eligible, iou[index][None, :], -1.0)
        best = boxes - 1 - candidate_iou[:, ::-1].argmax(axis=1)
        hit = eligible[rows, best]
        taken[rows[hit], best[hit]] = True
        matched[hit, index] = True
    return matched


def interpolated_ap(matched: BoolArray, instances: int) -> FloatArray:
    """AP per threshold from `[thresholds, predictions]` true-positive flags sorted by descending score."""
    true_pos = np.cumsum(matched, axis=1, dtype=np.float64)
    false_pos = np.cumsum(~matched, axis=1, dtype=np.float64)
    recall = true_pos / instances
    precision = true_pos / (true_pos + false_pos + np.spacing(1))
    # The precision envelope: at each recall, the best precision reachable at that recall or beyond.
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    ap = np.zeros(matched.shape[0])
    for t in range(matched.shape[0]):
        index = np.searchsorted(recall[t], RECALL_THRESHOLDS, side="left")
        reached = index < matched.shape[1]
        ap[t] = precision[t, index[reached]].sum() / len(RECALL_THRESHOLDS)
    return ap


@dataclass
class EvalReport:
    """What `edgefleet eval` prints and writes: the metrics with the settings and data that produced them."""

    model: Path
    data: Path
    split: str
    params: DetectParams
    providers: tuple[str, ...]
    metrics: DetectionMetrics
    wall_s: float
    mean_timing_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        metrics = self.metrics
        return {
            "model": str(self.model),
            "data": str(self.data),
            "split": self.split,
            "settings": {
                "conf": self.params.conf,
                "iou": self.params.iou,
                "max_det": self.params.max_det,
                "iou_thresholds": [round(t, 2) for t in IOU_THRESHOLDS.tolist()],
                "recall_points": len(RECALL_THRESHOLDS),
            },
            "providers": list(self.providers),
            "images": metrics.images,
            "instances": int(metrics.instances.sum()),
            "predictions": metrics.predictions,
            "map50": round(metrics.map50, 6),
            "map50_95": round(metrics.map50_95, 6),
            "classes": [ap.to_dict() for ap in metrics.per_class],
            "timing": {"wall_s": round(self.wall_s, 3), "mean_ms": self.mean_timing_ms},
        }


def evaluate(
    detector: Detector,
    dataset: LabelledDataset,
    params: DetectParams = EVAL_PARAMS,
    on_image: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Run the detector on every image of the dataset and score it; `on_image(done, total)` is progress."""
    start = time.perf_counter()
    to_dataset_class = class_mapping(detector.names, dataset.names)
    accumulator = MapAccumulator(len(dataset.names))
    stage_totals = np.zeros(3)
    for done, labelled in enumerate(dataset.images, start=1):
        image = read_image(labelled.path)
        result = detector.run(image, params)
        height, width = image.shape[:2]
        truth = GroundTruth(labelled.boxes_xyxy(width, height), labelled.class_ids)
        accumulator.add(_predictions(result, to_dataset_class), truth)
        stage_totals += (result.timing.pre_ms, result.timing.infer_ms, result.timing.post_ms)
        if on_image is not None:
            on_image(done, len(dataset.images))
    metrics = accumulator.result(dataset.names)
    mean_ms = stage_totals / max(len(dataset.images), 1)
    timing = {stage: round(float(ms), 3) for stage, ms in zip(("pre", "infer", "post"), mean_ms, strict=True)}
    return EvalReport(
        detector.model_path, dataset.yaml_path, dataset.split, params, detector.providers, metrics,
        time.perf_counter() - start, timing,
    )  # fmt: skip


def class_mapping(model_names: Sequence[str], dataset_names: Sequence[str]) -> IntArray:
    """For each model class id, the dataset class id of the same name, or -1 (its detections are dropped).

    A model without class names (`"0"`, `"1"`, ...) is mapped id for id.
    """
    if list(model_names) == [str(i) for i in range(len(model_names))]:
        return np.array([i if i < len(dataset_names) else -1 for i in range(len(model_names))], np.int64)
    dataset_ids = {name: i for i, name in enumerate(dataset_names)}
    mapping = np.array([dataset_ids.get(name, -1) for name in model_names], np.int64)
    if not (mapping >= 0).any():
        raise EvaluationError(
            f"the model's classes ({', '.join(model_names[:5])}, ...) share no names with the dataset's "
            f"({', '.join(dataset_names[:5])}, ...); evaluate with a dataset labelled for this model"
        )
    missing = sorted(set(dataset_names) - set(model_names))
    if missing:
        log.warning("the model lacks %d dataset classes (their AP is 0): %s", len(missing), missing[:10])
    return mapping


def read_image(path: Path) -> npt.NDArray[np.uint8]:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"{path}: cannot be read as an image (missing, corrupt or unsupported format)")
    return np.asarray(image, dtype=np.uint8)


def _predictions(result: DetectionResult, to_dataset_class: IntArray) -> Predictions:
    detections = result.detections
    boxes = np.array([d.bbox for d in detections], np.float64).reshape(-1, 4)
    class_ids = to_dataset_class[np.array([d.class_id for d in detections], np.int64)]
    scores = np.array([d.confidence for d in detections], np.float64)
    known = class_ids >= 0
    return Predictions(boxes[known], class_ids[known], scores[known])
