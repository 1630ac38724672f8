"""A small IoU tracker: detections of the same class that overlap across frames keep one `track_id`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from device_agent.detector import Detection


@dataclass(frozen=True, slots=True)
class TrackedDetection:
    detection: Detection
    track_id: int
    is_new: bool
    """True on the first frame this track is seen."""


@dataclass
class _Track:
    track_id: int
    class_id: int
    bbox: tuple[float, float, float, float]
    missed: int = 0
    last_confidence: float = 0.0


@dataclass
class IouTracker:
    """Greedy IoU matching per class, best overlap first; a track survives `max_missed` frames unseen."""

    iou_threshold: float = 0.3
    max_missed: int = 15
    _tracks: list[_Track] = field(default_factory=list)
    _next_id: int = 1

    def update(self, detections: list[Detection]) -> list[TrackedDetection]:
        matches = self._match(detections)
        tracked: list[TrackedDetection] = []
        matched_tracks: set[int] = set()
        for index, det in enumerate(detections):
            track = matches.get(index)
            is_new = track is None
            if track is None:
                track = _Track(self._next_id, det.class_id, det.bbox)
                self._next_id += 1
                self._tracks.append(track)
            track.bbox, track.missed, track.last_confidence = det.bbox, 0, det.confidence
            matched_tracks.add(track.track_id)
            tracked.append(TrackedDetection(det, track.track_id, is_new))
        for track in self._tracks:
            if track.track_id not in matched_tracks:
                track.missed += 1
        self._tracks = [t for t in self._tracks if t.missed <= self.max_missed]
        return tracked

    @property
    def active_track_ids(self) -> frozenset[int]:
        return frozenset(t.track_id for t in self._tracks if t.missed == 0)

    def _match(self, detections: list[Detection]) -> dict[int, _Track]:
        if not detections or not self._tracks:
            return {}
        overlap = iou_matrix(
            np.array([d.bbox for d in detections], dtype=np.float64),
            np.array([t.bbox for t in self._tracks], dtype=np.float64),
        )
        same_class = np.array([[d.class_id == t.class_id for t in self._tracks] for d in detections])
        overlap[~same_class] = 0.0
        matches: dict[int, _Track] = {}
        used_tracks: set[int] = set()
        for flat in np.argsort(-overlap, axis=None):
            det_index, track_index = divmod(int(flat), len(self._tracks))
            if overlap[det_index, track_index] < self.iou_threshold:
                break
            if det_index in matches or track_index in used_tracks:
                continue
            matches[det_index] = self._tracks[track_index]
            used_tracks.add(track_index)
        return matches


def iou_matrix(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """IoU of every box in `a` (n, 4) with every box in `b` (m, 4), boxes as x1, y1, x2, y2."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    intersection = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - intersection
    result: npt.NDArray[np.float64] = np.where(union > 0, intersection / np.maximum(union, 1e-9), 0.0)
    return result
