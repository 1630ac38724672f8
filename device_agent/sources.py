"""Frame sources: video files, cameras, RTSP/HTTP streams and image folders.

Each source captures on its own thread into a one-slot latest-frame buffer, so inference always takes the
newest frame and never falls behind real time; frames replaced before inference took them are counted as
dropped. A video file read with no target fps is the exception: it is paced by the consumer instead (every
frame is processed, none dropped), which is what offline processing and benchmarks want.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, Field

from device_agent.detector import Image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


class SourceConfig(BaseModel):
    """One camera, stream, video file or image folder."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Name of the source in detection events.")
    kind: Literal["video", "camera", "stream", "images"] = Field(description="What `uri` points at.")
    uri: str = Field(
        min_length=1,
        max_length=2048,
        description="Video file path, camera index, rtsp:// or http(s):// stream URL, or image folder.",
    )
    fps: float | None = Field(
        default=None,
        gt=0,
        le=240,
        description="Target frames per second. None: as fast as inference goes (files then drop nothing).",
    )
    loop: bool = Field(default=False, description="Start a video file or image folder again when it ends.")
    reconnect_min_s: float = Field(
        default=0.5, gt=0, description="First delay before reopening a lost stream."
    )
    reconnect_max_s: float = Field(default=30.0, gt=0, description="Longest delay between reopen attempts.")


@dataclass(frozen=True, slots=True)
class Frame:
    source_id: str
    seq: int
    image: Image
    captured_at: float


class FrameSource:
    """Runs capture on a thread; `next_frame()` hands the consumer the newest frame."""

    def __init__(self, config: SourceConfig) -> None:
        self.config = config
        self.frames_captured = 0
        self.frames_dropped = 0
        self.finished = threading.Event()
        self._slot: Frame | None = None
        self._slot_lock = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"source-{config.id}", daemon=True)
        self._seq = 0
        self._paced_by_consumer = config.kind in {"video", "images"} and config.fps is None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._slot_lock:
            self._slot_lock.notify_all()
        self._thread.join(timeout=5)

    def next_frame(self, timeout: float) -> Frame | None:
        """The newest frame not yet taken, waiting up to `timeout` s; None if none came."""
        with self._slot_lock:
            if self._slot is None:
                self._slot_lock.wait_for(lambda: self._slot is not None or self._stop.is_set(), timeout)
            frame, self._slot = self._slot, None
            self._slot_lock.notify_all()
            return frame

    def _publish(self, image: Image) -> None:
        frame = Frame(self.config.id, self._seq, image, time.time())
        self._seq += 1
        self.frames_captured += 1
        with self._slot_lock:
            if self._paced_by_consumer:
                self._slot_lock.wait_for(lambda: self._slot is None or self._stop.is_set())
            elif self._slot is not None:
                self.frames_dropped += 1
            self._slot = frame
            self._slot_lock.notify_all()

    def _run(self) -> None:
        try:
            if self.config.kind == "images":
                self._run_folder()
            else:
                self._run_capture()
        except Exception:  # a broken source must not take the agent down
            log.exception("source %s stopped on an unexpected error", self.config.id)
        finally:
            self.finished.set()

    def _pace(self, started: float) -> None:
        if self.config.fps:
            self._stop.wait(max(0.0, 1.0 / self.config.fps - (time.monotonic() - started)))

    def _run_capture(self) -> None:
        delay = self.config.reconnect_min_s
        while not self._stop.is_set():
            capture = self._open()
            if capture is None or not capture.isOpened():
                if self.config.kind == "video":
                    log.error("source %s: cannot open video file %s", self.config.id, self.config.uri)
                    return
                log.warning(
                    "source %s: cannot open %s; retrying in %.1f s", self.config.id, self.config.uri, delay
                )
                self._stop.wait(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.config.reconnect_max_s)
                continue
            delay = self.config.reconnect_min_s
            ended = self._read_until_end(capture)
            capture.release()
            if ended and self.config.kind == "video" and not self.config.loop:
                return

    def _open(self) -> cv2.VideoCapture | None:
        uri = self.config.uri
        if self.config.kind == "camera":
            return cv2.VideoCapture(int(uri)) if uri.isdigit() else cv2.VideoCapture(uri)
        if self.config.kind == "video" and not Path(uri).is_file():
            return None
        return cv2.VideoCapture(uri)

    def _read_until_end(self, capture: cv2.VideoCapture) -> bool:
        """Read frames until the stream ends (True) or stop is asked (False)."""
        while not self._stop.is_set():
            started = time.monotonic()
            ok, image = capture.read()
            if not ok or image is None:
                if self.config.kind in {"stream", "camera"}:
                    log.warning("source %s: stream lost; reconnecting", self.config.id)
                return True
            self._publish(image)
            self._pace(started)
        return False

    def _run_folder(self) -> None:
        seen: set[Path] = set()
        folder = Path(self.config.uri)
        while not self._stop.is_set():
            new_files = [p for p in _images_in(folder) if p not in seen]
            for path in new_files:
                if self._stop.is_set():
                    return
                seen.add(path)
                started = time.monotonic()
                image = _read_settled_image(path)
                if image is not None:
                    self._publish(image)
                    self._pace(started)
            if not new_files:
                if self.config.loop and seen:
                    seen.clear()
                    continue
                self._stop.wait(0.5)  # poll for new files


def _images_in(folder: Path) -> Iterator[Path]:
    try:
        yield from sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as error:
        log.warning("image folder %s cannot be listed: %s", folder, error)


def _read_settled_image(path: Path) -> Image | None:
    """Decode an image that may still be being written: a file changed in the last second must hold still."""
    try:
        stat = path.stat()
        while time.time() - stat.st_mtime < 1.0:
            time.sleep(0.2)
            if (newer := path.stat()).st_size == stat.st_size:
                break
            stat = newer
        image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    except OSError as error:
        log.warning("cannot read %s: %s", path, error)
        return None
    if image is None:
        log.warning("skipped %s: not a decodable image", path)
    return image
