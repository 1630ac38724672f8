"""Frame sources on the real pedestrian video and on image folders."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from device_agent.sources import FrameSource, SourceConfig


@pytest.fixture(scope="module")
def vtest(shared: Path) -> Path:
    return shared / "data" / "video" / "vtest.avi"


def take(source: FrameSource, count: int, pause_s: float = 0.0) -> list[int]:
    seqs = []
    while len(seqs) < count:
        frame = source.next_frame(timeout=5)
        assert frame is not None, "the source stopped delivering frames"
        seqs.append(frame.seq)
        time.sleep(pause_s)
    return seqs


def test_video_file_without_fps_drops_nothing(vtest: Path) -> None:
    source = FrameSource(SourceConfig(id="cam1", kind="video", uri=str(vtest)))
    source.start()
    try:
        assert take(source, 40, pause_s=0.005) == list(range(40))
        assert source.frames_dropped == 0
    finally:
        source.stop()


def test_live_pacing_keeps_the_latest_frame_and_counts_drops(vtest: Path) -> None:
    source = FrameSource(SourceConfig(id="cam1", kind="video", uri=str(vtest), fps=100))
    source.start()
    try:
        seqs = take(source, 8, pause_s=0.1)
        assert seqs == sorted(seqs)
        assert seqs[-1] - seqs[0] > 20  # the consumer sees recent frames, not a backlog
        assert source.frames_dropped > 10
    finally:
        source.stop()


def test_video_loops_when_asked(vtest: Path, tmp_path: Path) -> None:
    source = FrameSource(SourceConfig(id="cam1", kind="video", uri=str(vtest), loop=True))
    source.start()
    try:
        assert take(source, 3)[-1] == 2
        assert not source.finished.is_set()
    finally:
        source.stop()


def test_image_folder_picks_up_new_files(bus_jpg: Path, zidane_jpg: Path, tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    source = FrameSource(SourceConfig(id="drop", kind="images", uri=str(folder)))
    source.start()
    try:
        assert source.next_frame(timeout=0.3) is None
        shutil.copy(bus_jpg, folder / "1.jpg")
        (folder / "2.jpg").write_bytes(b"not really a jpeg")
        first = source.next_frame(timeout=5)
        assert first is not None
        assert first.image.shape == (1080, 810, 3)
        shutil.copy(zidane_jpg, folder / "3.jpg")
        second = source.next_frame(timeout=5)
        assert second is not None
        assert second.image.shape == (720, 1280, 3)
    finally:
        source.stop()


def test_missing_video_file_ends_the_source(tmp_path: Path) -> None:
    source = FrameSource(SourceConfig(id="cam1", kind="video", uri=str(tmp_path / "missing.avi")))
    source.start()
    assert source.finished.wait(5)
    assert source.next_frame(timeout=0.1) is None


def test_unreachable_stream_keeps_retrying_and_stops_promptly() -> None:
    config = SourceConfig(id="cam2", kind="stream", uri="http://127.0.0.1:9/none.mjpg", reconnect_min_s=0.1)
    source = FrameSource(config)
    source.start()
    time.sleep(1.0)
    assert not source.finished.is_set()
    started = time.monotonic()
    source.stop()
    assert time.monotonic() - started < 5
    assert source.finished.is_set()


def test_source_config_is_validated() -> None:
    with pytest.raises(ValueError, match="id"):
        SourceConfig(id="bad/id", kind="video", uri="x.avi")
    with pytest.raises(ValueError, match="kind"):
        SourceConfig(id="a", kind="webcam", uri="0")  # type: ignore[arg-type]
