"""Over-the-air model updates on the device: the state machine, probation and rollback.

``idle → downloading → verifying → staging → activating → active``; any step may end in ``failed`` (the
device keeps the model it has), and a newly active model is on probation until it has served
``probation_s`` seconds and ``probation_frames`` frames: inference errors, or a p95 frame latency over
``latency_budget_ms x rollback_factor``, end it in ``rolled_back`` (the previous model serves again).

Every transition is written to the model store's record before it is reported, so after a crash the agent
starts on a verified model and picks the update up where the record says it was (see docs/ota.md). The
core knows nothing of MQTT: `desired()` takes decoded `model/desired` payloads, `report` is handed each
`ModelReported`, and the inference loop tells `record_frame()` how each frame went.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from device_agent.config import OtaConfig
from device_agent.detector import PAD_VALUE, Detector
from device_agent.downloader import (
    DownloadCancelled,
    DownloadError,
    DownloadRequest,
    DownloadResult,
    ProgressCallback,
    download,
)
from device_agent.model_store import ModelStore, OtaJob, OtaRecord, StoredModel
from device_agent.pipeline import ActiveModel, ModelSlot
from fleet_protocol.onnx_model import ModelLoadError
from fleet_protocol.payloads import ModelDesired, ModelRef, ModelReported, OtaState
from fleet_protocol.signing import ModelManifest, SigningError, TrustStore, file_digest

log = logging.getLogger(__name__)

PROGRESS_REPORT_INTERVAL_S = 0.5
MIN_FRAMES_FOR_P95 = 3
STEPS = (OtaState.DOWNLOADING, OtaState.VERIFYING, OtaState.STAGING, OtaState.ACTIVATING)


class ModelLoader(Protocol):
    """Open a model file as a detector with its thresholds (not yet warmed up); ModelLoadError/ValueError."""

    def __call__(self, path: Path, ref: ModelRef) -> ActiveModel: ...


class Fetcher(Protocol):
    def __call__(
        self,
        request: DownloadRequest,
        *,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> DownloadResult: ...


class UpdateFailedError(Exception):
    """A step failed for a reason the report states; the device keeps its model."""


class _SupersededError(Exception):
    """A newer `model/desired` arrived, or the agent is stopping: drop this job where it is."""


@dataclass
class _Probation:
    model: ActiveModel
    fallback: ActiveModel | None  # the model before, still loaded (None after a restart: load from disk)
    started: float = field(default_factory=time.monotonic)
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    last_error: str | None = None


def same_update(a: ModelDesired, b: ModelDesired) -> bool:
    """The same rollout asking for the same bytes (a new URL or signature string does not make it new)."""
    return (a.rollout_id, a.name, a.version, a.sha256) == (b.rollout_id, b.name, b.version, b.sha256)


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class OtaManager:
    """Applies the desired model on a worker thread; `boot()` first, then `start(slot)`."""

    def __init__(
        self,
        config: OtaConfig,
        store: ModelStore,
        *,
        trust_store: Path,
        load: ModelLoader,
        load_configured: Callable[[], ActiveModel],
        configured_path: Path,
        report: Callable[[ModelReported], None],
        device_id: str,
        on_model_changed: Callable[[], None] = lambda: None,
        fetch: Fetcher = download,
        smoke_test: bool = True,
    ) -> None:
        self.config = config
        self.store = store
        self.trust_store = trust_store
        self.device_id = device_id
        self._load = load
        self._load_configured = load_configured
        self._configured_path = configured_path
        self._report_sink = report
        self._on_model_changed = on_model_changed
        self._fetch = fetch
        # False only for the fleet simulator (device_agent.sim), whose devices share one loaded model.
        self._smoke = smoke_test
        self._record = OtaRecord()
        self._record_lock = threading.RLock()
        self._slot: ModelSlot | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._cancel = threading.Event()  # set when the job in hand is superseded or the agent stops
        self._wanted: ModelDesired | None = None
        self._generation = 0  # bumped by every desired that names another update
        self._handled = 0
        self._force_retry = False
        self._probation: _Probation | None = None
        self._probation_lock = threading.Lock()
        self._last_progress_report = 0.0
        self._thread: threading.Thread | None = None
        self.last_report: ModelReported | None = None

    # ---- start and stop --------------------------------------------------------------------------------

    def boot(self) -> ActiveModel:
        """Read the record, settle what a crash left open, and load the model to start on (never none)."""
        record = self.store.load()
        job = record.job
        if job is not None and job.in_flight:
            if job.clean_stop:
                job.clean_stop = False
            else:
                job.restarts += 1
                log.warning("OTA: the agent restarted while %s; resuming", _phase(job))
            if job.restarts > self.config.max_restarts:
                why = f"the agent restarted {job.restarts} times while {_phase(job)}; giving up on this model"
                if job.in_probation:
                    previous = record.previous
                    record.current = previous if previous is not None and previous.origin == "ota" else None
                    record.previous = None
                    job.state, job.error = OtaState.ROLLED_BACK, why
                else:
                    job.state, job.error = OtaState.FAILED, why
                log.error("OTA: %s", why)
            self.store.save(record)
        active = self._boot_model(record)
        self._record = record
        return active

    def _boot_model(self, record: OtaRecord) -> ActiveModel:
        candidates = [m for m in (record.current, record.previous) if m is not None]
        for index, candidate in enumerate(candidates):
            if candidate.origin == "config":
                break
            problem = self.store.check(candidate)
            if problem is None:
                try:
                    active = self._load(self.store.path_of(candidate), candidate.ref)
                except (ModelLoadError, ValueError) as error:
                    problem = str(error)
                else:
                    active.detector.warmup()
                    if index > 0:
                        self._fall_back_on_boot(record, candidate, "the current model")
                    return active
            log.error("OTA: cannot start on %s@%s: %s", candidate.name, candidate.version, problem)
        active = self._load_configured()
        if record.current is not None and record.current.origin != "config":
            self._fall_back_on_boot(record, None, "the stored models")
        return active

    def _fall_back_on_boot(self, record: OtaRecord, running: StoredModel | None, what: str) -> None:
        why = f"{what} failed verification at start; running the model before it"
        job = record.job
        if job is not None and (job.in_probation or job.state is OtaState.ACTIVE):
            job.state, job.error, job.committed = OtaState.ROLLED_BACK, why, True
        record.current, record.previous = running, None
        self.store.save(record)

    def start(self, slot: ModelSlot) -> None:
        self._slot = slot
        with self._record_lock:
            job = self._record.job
            # The retained desired arrives again after every connect: the same update must not restart.
            self._wanted = job.desired if job is not None else None
            if job is not None and job.in_probation:
                self._probation = _Probation(model=slot.get(), fallback=None)
                self._publish_active(job.desired.rollout_id, progress=0.0)
            elif job is not None and job.in_flight:
                self._generation = 1  # resume it
            elif job is not None and job.state in (OtaState.FAILED, OtaState.ROLLED_BACK):
                self._publish_job(job, job.state, error=job.error)
            else:
                self._publish_active(self._current_rollout(), progress=1.0)
        self._thread = threading.Thread(target=self._run, name="ota", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._cancel.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._record_lock:
            job = self._record.job
            if job is not None and job.in_flight and not job.clean_stop:
                job.clean_stop = True
                self.store.save(self._record)

    # ---- inputs ----------------------------------------------------------------------------------------

    def desired(self, desired: ModelDesired | None) -> None:
        """A `model/desired` arrived (None: cleared): the newest wins; the same update is not restarted."""
        with self._cond:
            wanted = self._wanted
            if desired is not None and wanted is not None and same_update(desired, wanted):
                self._wanted = desired  # e.g. a fresh URL for the same file: the next attempt uses it
                return
            if desired is None and wanted is None:
                return
            self._wanted = desired
            self._generation += 1
            self._cancel.set()
            self._cond.notify_all()

    def retry(self) -> None:
        """Try the desired model again even though it failed or was rolled back (command `ota/retry`)."""
        with self._cond:
            self._force_retry = True
            self._generation += 1
            self._cond.notify_all()

    def record_frame(self, model: ActiveModel | None, latency_ms: float | None, error: str | None) -> None:
        """How one frame went (from the inference loop); only frames of a model on probation count."""
        probation = self._probation
        if probation is None or model is not probation.model:
            return
        with self._probation_lock:
            if error is not None:
                probation.errors += 1
                probation.last_error = error
            elif latency_ms is not None:
                probation.latencies_ms.append(latency_ms)
        if error is not None:
            with self._cond:
                self._cond.notify_all()

    def snapshot(self) -> dict[str, Any]:
        """The OTA state for the local status API."""
        report = self.last_report
        probation = self._probation
        return {
            "state": report.state.value if report else None,
            "model": report.model.model_dump() if report and report.model else None,
            "rollout_id": report.rollout_id if report else None,
            "progress": report.progress if report else None,
            "error": report.error if report else None,
            "in_probation": probation is not None,
            "probation_frames": len(probation.latencies_ms) if probation else 0,
        }

    # ---- the worker ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                if self._probation is not None:
                    self._cond.wait(0.1)  # judge the probation often; a newer desired waits for the verdict
                else:
                    self._cond.wait_for(lambda: self._stop.is_set() or self._generation != self._handled)
            if self._stop.is_set():
                return
            try:
                if self._probation is not None:
                    self._check_probation()
                    if self._probation is not None:
                        continue  # a newer desired waits until the model on probation is judged
                with self._cond:
                    if self._generation == self._handled:
                        continue
                    generation, desired = self._generation, self._wanted
                    force, self._force_retry = self._force_retry, False
                    self._handled = generation
                    self._cancel.clear()
                self._apply(desired, generation, force)
            except Exception:  # the OTA worker must survive anything a model or a disk throws at it
                log.exception("OTA worker error; the device keeps its model")
                self._stop.wait(1.0)

    def _apply(self, desired: ModelDesired | None, generation: int, force: bool) -> None:
        with self._record_lock:
            record = self._record
            if desired is None:
                log.info("OTA: desired model cleared; keeping %s", _name(self._running_ref()))
                self._publish_active(self._current_rollout(), progress=1.0)
                return
            current = record.current
            if (current is not None and _same_model(current, desired)) or self._is_configured(desired):
                log.info("OTA: %s@%s is already active", desired.name, desired.version)
                if current is not None:
                    current.rollout_id = desired.rollout_id
                job = record.job
                if job is None or not same_update(job.desired, desired) or job.state is not OtaState.ACTIVE:
                    record.job = OtaJob(desired=desired, state=OtaState.ACTIVE, committed=True)
                self.store.save(record)
                self._publish_active(desired.rollout_id, progress=1.0)
                return
            job = record.job
            resume = job is not None and same_update(job.desired, desired)
            if (
                resume
                and job is not None
                and job.state in (OtaState.FAILED, OtaState.ROLLED_BACK)
                and not force
            ):
                log.info(
                    "OTA: %s@%s already %s; not retrying", desired.name, desired.version, job.state.value
                )
                self._publish_job(job, job.state, error=job.error)
                return
            if not (resume and job is not None and job.in_flight):
                job = OtaJob(desired=desired, state=OtaState.IDLE)
            job.desired = desired
            record.job = job
        self._run_job(job, generation)

    def _run_job(self, job: OtaJob, generation: int) -> None:
        desired = job.desired
        state = job.state if job.state in STEPS else OtaState.DOWNLOADING
        log.info(
            "OTA: applying %s@%s (rollout %s) from %s",
            desired.name,
            desired.version,
            desired.rollout_id,
            state.value,
        )
        staged: ActiveModel | None = None
        verified_now = False
        try:
            key_id = self._check_signature(desired)
            while True:
                self._check_current(generation)
                if state is OtaState.DOWNLOADING:
                    self._download(job, generation)
                    state = OtaState.VERIFYING
                elif state is OtaState.VERIFYING:
                    if self._verify(job):
                        verified_now, state = True, OtaState.STAGING
                    else:
                        state = OtaState.DOWNLOADING
                elif state is OtaState.STAGING or staged is None:
                    staged = self._stage(job, key_id, recheck=not verified_now)
                    state = OtaState.ACTIVATING
                else:
                    self._activate(job, staged, key_id, generation)
                    return
        except UpdateFailedError as error:
            self._fail(job, str(error))
        except _SupersededError:
            log.info("OTA: %s@%s superseded or stopped in %s", desired.name, desired.version, job.state.value)

    # ---- steps -----------------------------------------------------------------------------------------

    def _check_signature(self, desired: ModelDesired) -> str | None:
        manifest = ModelManifest(desired.name, desired.version, desired.sha256, desired.size)
        if desired.signature is None:
            if self.config.allow_unsigned:
                log.warning(
                    "OTA: %s@%s is unsigned; accepted (ota.allow_unsigned)", desired.name, desired.version
                )
                return None
            raise UpdateFailedError(
                "the model is unsigned and unsigned models are refused (ota.allow_unsigned is false)"
            )
        try:
            return TrustStore.from_dir(self.trust_store).verify(manifest, desired.signature)
        except SigningError as error:
            raise UpdateFailedError(f"signature check failed: {error}") from None

    def _download(self, job: OtaJob, generation: int) -> None:
        desired = job.desired
        part = self.store.part_path(desired)
        have = part.stat().st_size if part.exists() else 0
        if have > 0:
            job.resumed = True
        self._enter(job, OtaState.DOWNLOADING, progress=min(1.0, have / desired.size))
        deadline = time.monotonic() + self.config.give_up_after_s
        attempt = 0
        while True:
            self._check_current(generation)
            wanted = self._wanted
            url = wanted.url if wanted is not None and same_update(wanted, desired) else desired.url
            request = DownloadRequest(
                url=url,
                target=part,
                size=desired.size,
                sha256=desired.sha256,
                token=self._token(),
                timeout_s=self.config.download_timeout_s,
                ca_file=self.config.tls_ca,
            )
            try:
                result = self._fetch(request, progress=self._progress(job), cancel=self._cancel)
            except DownloadCancelled:
                raise _SupersededError from None
            except DownloadError as error:
                if error.permanent:
                    raise UpdateFailedError(f"download failed: {error}") from None
                if time.monotonic() > deadline:
                    raise UpdateFailedError(
                        f"download failed for {self.config.give_up_after_s:.0f} s; last error: {error}"
                    ) from None
                delay = _backoff(attempt, self.config.retry_min_s, self.config.retry_max_s)
                attempt += 1
                have = part.stat().st_size if part.exists() else 0
                job.resumed = job.resumed or have > 0
                log.warning("OTA: download of %s: %s; retrying in %.1f s", desired.name, error, delay)
                self._publish_job(
                    job, OtaState.DOWNLOADING, progress=have / desired.size, error=f"{error}; retrying"
                )
                if self._cancel.wait(delay):
                    raise _SupersededError from None
                continue
            if result.resumed_from > 0:
                job.resumed = True
            return

    def _progress(self, job: OtaJob) -> ProgressCallback:
        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - self._last_progress_report >= PROGRESS_REPORT_INTERVAL_S and done < total:
                self._last_progress_report = now
                self._publish_job(job, OtaState.DOWNLOADING, progress=done / total)

        return progress

    def _verify(self, job: OtaJob) -> bool:
        """True when the download is the signed bytes (and now installed); False: download it again."""
        desired = job.desired
        self._enter(job, OtaState.VERIFYING)
        part = self.store.part_path(desired)
        installed = self.store.installed(desired)
        if not part.exists() and installed is not None:  # a crash after the file was moved in
            problem = self.store.check(self.store.stored(desired, None))
            if problem is None:
                return True
            installed.unlink()
            raise UpdateFailedError(f"the installed file is damaged: {problem}")
        try:
            digest, size = file_digest(part)
        except OSError as error:
            job.resumed = False
            log.warning("OTA: downloaded file unreadable (%s); downloading again", error)
            return False
        problem = None
        if size != desired.size:
            problem = f"size mismatch: downloaded {size} bytes, the manifest says {desired.size}"
        elif digest != desired.sha256:
            problem = f"sha256 mismatch: downloaded {digest}, the manifest says {desired.sha256}"
        if problem is not None:
            part.unlink(missing_ok=True)
            if job.resumed:
                # A resumed download may have stitched two different files (or a torn write): one fresh try.
                log.warning("OTA: %s after a resumed download; downloading once more from the start", problem)
                job.resumed = False
                return False
            raise UpdateFailedError(problem)
        self._check_signature(desired)  # the trust store may have changed since the download began
        self.store.install(desired, None)
        return True

    def _stage(self, job: OtaJob, key_id: str | None, *, recheck: bool) -> ActiveModel:
        desired = job.desired
        self._enter(job, OtaState.STAGING)
        stored = self.store.stored(desired, key_id)
        if recheck and (problem := self.store.check(stored)) is not None:
            raise UpdateFailedError(f"staging: the stored file is damaged: {problem}")
        started = time.perf_counter()
        try:
            active = self._load(self.store.path_of(stored), desired.model_ref)
        except (ModelLoadError, ValueError) as error:
            raise UpdateFailedError(f"staging: the model does not load: {error}") from None
        loaded = time.perf_counter()
        if not self._smoke:
            log.info("OTA: staged %s@%s (smoke test skipped)", desired.name, desired.version)
            return active
        self._smoke_test(active.detector)
        log.info(
            "OTA: staged %s@%s: session %.0f ms, smoke test %.0f ms",
            desired.name,
            desired.version,
            (loaded - started) * 1e3,
            (time.perf_counter() - loaded) * 1e3,
        )
        return active

    def _smoke_test(self, detector: Detector) -> None:
        spec = detector.spec
        image = np.full((spec.input_height, spec.input_width, 3), PAD_VALUE, np.uint8)
        try:  # the first inference is also the session's warm-up
            tensor, _ = detector.preprocess(image)
            output = detector.infer(tensor)
        except Exception as error:  # onnxruntime raises several unrelated types
            raise UpdateFailedError(f"staging: smoke inference failed: {error}") from None
        expected = 4 + len(detector.names)
        per_anchor = output.shape[1] if spec.channels_first_output else output.shape[-1]
        if output.ndim != 3 or output.shape[0] != 1 or per_anchor != expected:
            raise UpdateFailedError(
                f"staging: output shape {list(output.shape)} does not fit a detector of "
                f"{len(detector.names)} classes (expected [1, {expected}, anchors] or "
                f"[1, anchors, {expected}])"
            )
        if not np.isfinite(output).all():
            raise UpdateFailedError("staging: the smoke inference gave non-finite values (NaN or inf)")
        # The fastest run is judged: the current model keeps inferring meanwhile, so contention for the cores
        # inflates single runs; probation judges the new model's latency on real frames.
        fastest = min(detector.run(image).timing.total_ms for _ in range(self.config.smoke_runs))
        if fastest > self.config.latency_budget_ms:
            raise UpdateFailedError(
                f"staging: smoke inference took {fastest:.0f} ms (fastest of {self.config.smoke_runs}), "
                f"over the latency budget of {self.config.latency_budget_ms:.0f} ms"
            )
        log.info("OTA: smoke inference passed: output %s, %.1f ms", list(output.shape), fastest)

    def _activate(self, job: OtaJob, staged: ActiveModel, key_id: str | None, generation: int) -> None:
        self._enter(job, OtaState.ACTIVATING)
        self._check_current(generation)
        assert self._slot is not None
        with self._record_lock:
            record = self._record
            before = record.current or self._configured_stored()
            old = self._slot.swap(staged)  # takes effect between two frames
            record.previous, record.current = before, self.store.stored(job.desired, key_id)
            job.state, job.error, job.committed = OtaState.ACTIVE, None, False
            self.store.save(record)  # the commit point: a crash from here on restarts on the new model
            self._probation = _Probation(model=staged, fallback=old)
            self.store.prune([record.current, record.previous])
            log.info("OTA: %s@%s active; probation begins", job.desired.name, job.desired.version)
            self._publish_active(job.desired.rollout_id, progress=0.0)
        self._on_model_changed()
        if self.config.probation_s == 0 and self.config.probation_frames == 0:
            self._check_probation()

    def _check_probation(self) -> None:
        probation = self._probation
        if probation is None:
            return
        with self._probation_lock:
            latencies = list(probation.latencies_ms)
            errors, last_error = probation.errors, probation.last_error
        if errors > self.config.probation_max_errors:
            self._roll_back(f"{errors} inference error(s) in probation (last: {last_error})")
            return
        limit = self.config.latency_budget_ms * self.config.rollback_factor
        enough = len(latencies) >= max(self.config.probation_frames, MIN_FRAMES_FOR_P95)
        if enough and (slow := p95(latencies)) > limit:
            self._roll_back(
                f"p95 latency {slow:.0f} ms over {len(latencies)} frames in probation exceeds the budget "
                f"{self.config.latency_budget_ms:.0f} ms x {self.config.rollback_factor:g}"
            )
            return
        elapsed = time.monotonic() - probation.started
        if elapsed >= self.config.probation_s and len(latencies) >= self.config.probation_frames:
            self._commit(probation, latencies)

    def _commit(self, probation: _Probation, latencies: list[float]) -> None:
        with self._record_lock:
            job = self._record.job
            self._probation = None
            if job is None:
                return
            job.committed = True
            self.store.save(self._record)
            summary = (
                f"p95 {p95(latencies):.0f} ms over {len(latencies)} frames" if latencies else "no frames"
            )
            log.info("OTA: %s@%s passed probation (%s)", job.desired.name, job.desired.version, summary)
            self._publish_active(job.desired.rollout_id, progress=1.0)

    def _roll_back(self, why: str) -> None:
        assert self._slot is not None
        probation, self._probation = self._probation, None
        assert probation is not None
        with self._record_lock:
            record = self._record
            job = record.job
            target = record.previous
            fallback = probation.fallback
            if fallback is None:
                fallback, problem = self._load_stored(target)
                if fallback is None:
                    why = f"{why}; but the previous model cannot be loaded ({problem}), so this one stays"
                    log.error("OTA: %s", why)
                    if job is not None:
                        job.committed, job.state, job.error = True, OtaState.FAILED, why
                        self.store.save(record)
                        self._publish_job(job, OtaState.FAILED, error=why)
                    return
            self._slot.swap(fallback)
            record.current, record.previous = (target if target and target.origin == "ota" else None), None
            if job is not None:
                job.state, job.error, job.committed = OtaState.ROLLED_BACK, why, True
            self.store.save(record)
            self.store.prune([record.current])
            log.error("OTA: rolled back to %s: %s", _name(fallback.ref), why)
            if job is not None:
                self._publish_job(job, OtaState.ROLLED_BACK, error=why)
        self._on_model_changed()

    def _load_stored(self, model: StoredModel | None) -> tuple[ActiveModel | None, str | None]:
        if model is None or model.origin == "config":
            try:
                return self._load_configured(), None
            except (ModelLoadError, ValueError) as error:
                return None, str(error)
        problem = self.store.check(model)
        if problem is not None:
            return None, problem
        try:
            active = self._load(self.store.path_of(model), model.ref)
            active.detector.warmup()
            return active, None
        except (ModelLoadError, ValueError) as error:
            return None, str(error)

    def _fail(self, job: OtaJob, why: str) -> None:
        log.error("OTA: %s@%s failed in %s: %s", job.desired.name, job.desired.version, job.state.value, why)
        with self._record_lock:
            job.state, job.error = OtaState.FAILED, why
            self._record.job = job
            self.store.save(self._record)
            self.store.prune([self._record.current, self._record.previous])
            self._publish_job(job, OtaState.FAILED, error=why)

    # ---- persistence and reports -----------------------------------------------------------------------

    def _enter(self, job: OtaJob, state: OtaState, progress: float = 0.0) -> None:
        with self._record_lock:
            job.state, job.error = state, None
            self._record.job = job
            self.store.save(self._record)
            self._publish_job(job, state, progress=progress)
        hold = next((s for name, s in self.config.test_hold_s.items() if name == state.value), 0.0)
        if hold:
            log.warning("OTA: holding %.1f s in %s (ota.test_hold_s)", hold, state.value)
            self._stop.wait(hold)

    def _check_current(self, generation: int) -> None:
        if self._stop.is_set() or self._generation != generation:
            raise _SupersededError

    def _publish_job(
        self, job: OtaJob, state: OtaState, *, progress: float = 0.0, error: str | None = None
    ) -> None:
        self._publish(
            ModelReported(
                device_id=self.device_id,
                rollout_id=job.desired.rollout_id,
                model=job.desired.model_ref,
                state=state,
                progress=min(1.0, max(0.0, progress)),
                error=_clip(error),
                previous_model=self._running_ref(),
            )
        )

    def _publish_active(self, rollout_id: str | None, *, progress: float) -> None:
        previous = self._record.previous
        self._publish(
            ModelReported(
                device_id=self.device_id,
                rollout_id=rollout_id,
                model=self._running_ref(),
                state=OtaState.ACTIVE,
                progress=progress,
                previous_model=previous.ref if previous is not None else None,
            )
        )

    def _publish(self, report: ModelReported) -> None:
        self.last_report = report
        try:
            self._report_sink(report)
        except Exception:
            log.exception("OTA: could not publish model/reported")

    # ---- helpers ---------------------------------------------------------------------------------------

    def _running_ref(self) -> ModelRef:
        assert self._slot is not None
        return self._slot.get().ref

    def _current_rollout(self) -> str | None:
        current = self._record.current
        return current.rollout_id if current is not None else None

    def _is_configured(self, desired: ModelDesired) -> bool:
        """The settings' model is running and it is the desired one (same name, version and bytes)."""
        if self._record.current is not None or self._slot is None:
            return False
        ref = self._slot.get().ref
        if (ref.name, ref.version) != (desired.name, desired.version):
            return False
        return file_digest(self._configured_path)[0] == desired.sha256

    def _configured_stored(self) -> StoredModel:
        assert self._slot is not None
        ref = self._slot.get().ref
        digest, size = file_digest(self._configured_path)
        return StoredModel(
            name=ref.name,
            version=ref.version,
            sha256=digest,
            size=size,
            file=str(self._configured_path.resolve()),
            origin="config",
        )

    def _token(self) -> str | None:
        if self.config.token is not None:
            return self.config.token.get_secret_value()
        if self.config.token_file is not None:
            try:
                return self.config.token_file.read_text(encoding="utf-8").strip() or None
            except OSError as error:
                raise UpdateFailedError(
                    f"cannot read ota.token_file {self.config.token_file}: {error}"
                ) from None
        return None


def _same_model(stored: StoredModel, desired: ModelDesired) -> bool:
    return (stored.name, stored.version, stored.sha256) == (desired.name, desired.version, desired.sha256)


def _phase(job: OtaJob) -> str:
    return "on probation" if job.in_probation else job.state.value


def _name(ref: ModelRef) -> str:
    return f"{ref.name}@{ref.version}"


def _clip(text: str | None, limit: int = 2000) -> str | None:
    return text if text is None or len(text) <= limit else text[: limit - 1] + "…"


def _backoff(attempt: int, low: float, high: float) -> float:
    cap = min(high, low * 2 ** min(attempt, 32))
    return random.uniform(cap / 2, cap)
