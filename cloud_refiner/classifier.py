"""An ImageNet-style ONNX classifier on onnxruntime: preprocessing from the model's metadata or from config.

Nothing here is specific to one model. The preprocessing recipe (resize the shorter side, center-crop,
subtract a mean, divide by a std, channel order) comes from, in order:

1. `ClassifierConfig.preprocess` (config), when given;
2. a `preprocess` metadata entry holding the same fields as JSON;
3. the reference recipe written in the `input` metadata entry, e.g. EfficientNet-Lite2's
   "resize shorter side to 292 ..., center-crop 260x260, then (pixel - 127) / 128".

A model with none of these (MobileNetV2 from the ONNX zoo, for one) is refused with a ModelLoadError that
says which config section to add. Class names come from `labels_file` (config) or the `names` metadata.

    classifier = Classifier.from_config(ClassifierConfig(path=Path("efficientnet-lite2.onnx")))
    probs = classifier.classify([classifier.prepare(image_bgr)])  # [1, 1000], rows sum to 1
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import cv2
import numpy as np
from pydantic import ValidationError

from cloud_refiner.config import ClassifierConfig, PreprocessConfig
from fleet_protocol.onnx_model import (
    ModelInfo,
    ModelLoadError,
    SessionOptions,
    open_session,
    parse_class_names,
)

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}
_SYNSET_LINE = re.compile(r"^n\d{8}\s+(.+)$")
_RESIZE_RE = re.compile(r"resize (?:the )?shorter side to (\d+)", re.IGNORECASE)
_CROP_RE = re.compile(r"center[- ]?crop (\d+)(?:\s*x\s*(\d+))?", re.IGNORECASE)
_SCALE_RE = re.compile(r"\(\s*pixel\s*-\s*([0-9.]+)\s*\)\s*/\s*([0-9.]+)", re.IGNORECASE)
_CROP_FRACTION = 0.875  # the usual ImageNet eval ratio, when a model names only its crop size

OutputKind = Literal["auto", "logits", "probabilities"]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_labels_file(path: Path) -> list[str]:
    """Class names, one per line; ImageNet synset lines (`n01440764 tench, Tinca tinca`) give `tench`."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as error:
        raise ModelLoadError(f"cannot read the labels file {path}: {error}") from error
    names = []
    for line in lines:
        synset = _SYNSET_LINE.match(line)
        names.append(synset.group(1).split(",")[0].strip() if synset else line)
    return names


def preprocess_from_metadata(
    metadata: Mapping[str, str], input_hw: tuple[int | None, int | None]
) -> PreprocessConfig | None:
    """The recipe a model states about itself (see the module doc), or None when it states none."""
    raw = metadata.get("preprocess")
    if raw:
        try:
            return PreprocessConfig.model_validate(json.loads(raw))
        except (ValueError, ValidationError) as error:
            raise ModelLoadError(
                f"the model's `preprocess` metadata is not a valid recipe: {error}"
            ) from error
    text = metadata.get("input", "")
    scale = _SCALE_RE.search(text)
    if scale is None:
        return None
    crop_match = _CROP_RE.search(text)
    if crop_match is not None:
        height = int(crop_match.group(1))
        crop = (height, int(crop_match.group(2) or height))
    elif input_hw[0] is not None and input_hw[1] is not None:
        crop = (input_hw[0], input_hw[1])
    else:
        return None
    resize_match = _RESIZE_RE.search(text)
    resize = int(resize_match.group(1)) if resize_match else round(min(crop) / _CROP_FRACTION)
    mean, std = float(scale.group(1)), float(scale.group(2))
    return PreprocessConfig(
        resize_shorter=resize,
        crop=crop,
        mean=(mean, mean, mean),
        std=(std, std, std),
        channel_order="BGR" if re.search(r"\bBGR\b", text) else "RGB",
    )


@dataclass(frozen=True)
class ClassifierInfo:
    """What a loaded classifier is, for replies, metrics and MLflow."""

    name: str
    version: str
    path: Path
    sha256: str
    providers: tuple[str, ...]
    num_classes: int
    preprocess: PreprocessConfig
    preprocess_source: str  # "config", "metadata:preprocess" or "metadata:input"
    fixed_batch: int | None  # the input's batch dimension when it is fixed (then batches are split)


class Classifier:
    """One onnxruntime session; `classify` is thread-safe (onnxruntime sessions may run concurrently)."""

    def __init__(
        self,
        path: Path,
        *,
        labels_file: Path | None = None,
        preprocess: PreprocessConfig | None = None,
        output: OutputKind = "auto",
        session_options: SessionOptions | None = None,
        name: str | None = None,
        version: str | None = None,
    ) -> None:
        path = Path(path)
        self._session: ort.InferenceSession
        self._session, model = open_session(path, session_options)
        self.model: ModelInfo = model
        layout, input_hw, fixed_batch = _input_layout(model)
        self._nhwc = layout == "NHWC"
        self._dtype = np.float16 if model.is_fp16 else np.float32
        source = "config"
        if preprocess is None:
            preprocess = preprocess_from_metadata(model.metadata, input_hw)
            source = "metadata:preprocess" if "preprocess" in model.metadata else "metadata:input"
        if preprocess is None:
            raise ModelLoadError(
                f"{path} does not describe its preprocessing in its metadata: set classifier.preprocess "
                "(resize_shorter, crop, mean, std in pixel units, channel_order) in the refiner config; "
                "docs/refiner.md has the values for the ImageNet zoo models"
            )
        for got, want in zip(preprocess.crop, input_hw, strict=True):
            if want is not None and got != want:
                raise ModelLoadError(
                    f"{path}: the preprocessing crops to {list(preprocess.crop)} but the model's input is "
                    f"{list(input_hw)}; fix classifier.preprocess.crop"
                )
        self.names = self._class_names(path, labels_file)
        self.preprocess = preprocess
        self.output: OutputKind = output
        self._mean = np.asarray(preprocess.mean, np.float32)
        self._inv_std = 1.0 / np.asarray(preprocess.std, np.float32)
        self._interpolation = _INTERPOLATION[preprocess.interpolation]
        self._lock = threading.Lock()  # only guards lazily computed state, never inference
        sha256 = file_sha256(path)
        self.info = ClassifierInfo(
            name=name or path.name.removesuffix(".onnx"),
            version=version or sha256[:12],
            path=path,
            sha256=sha256,
            providers=model.providers,
            num_classes=len(self.names),
            preprocess=preprocess,
            preprocess_source=source,
            fixed_batch=fixed_batch,
        )

    @classmethod
    def from_config(cls, config: ClassifierConfig) -> Classifier:
        options = SessionOptions(providers=config.providers, intra_op_threads=config.threads)
        return cls(
            config.path,
            labels_file=config.labels_file,
            preprocess=config.preprocess,
            output=config.output,
            session_options=options,
            name=config.name,
            version=config.version,
        )

    def _class_names(self, path: Path, labels_file: Path | None) -> list[str]:
        outputs = self.model.output_shapes[0] if self.model.output_shapes else ()
        width = outputs[-1] if outputs and isinstance(outputs[-1], int) else None
        if labels_file is not None:
            names = read_labels_file(labels_file)
        elif "names" in self.model.metadata:
            names = parse_class_names(self.model.metadata["names"])
        elif width is not None:
            raise ModelLoadError(
                f"{path} has no `names` metadata: set classifier.labels_file (one class per line, or "
                "ImageNet synset lines such as imagenet_synset.txt)"
            )
        else:
            raise ModelLoadError(f"{path} has neither `names` metadata nor a fixed output width")
        if width is not None and len(names) != width:
            raise ModelLoadError(f"{path} outputs {width} classes but {len(names)} class names were given")
        return [name if name.strip() else str(index) for index, name in enumerate(names)]

    @property
    def input_size(self) -> tuple[int, int]:
        return self.preprocess.crop

    def prepare(self, image_bgr: np.ndarray) -> np.ndarray:
        """Resize and center-crop one BGR image: uint8 [H, W, 3] in the model's channel order.

        Normalisation is left to `classify`, which does it once for the whole batch.
        """
        crop_h, crop_w = self.preprocess.crop
        height, width = image_bgr.shape[:2]
        scale = max(self.preprocess.resize_shorter / min(height, width), crop_h / height, crop_w / width)
        new_w, new_h = max(crop_w, round(width * scale)), max(crop_h, round(height * scale))
        resized = cv2.resize(image_bgr, (new_w, new_h), interpolation=self._interpolation)
        top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
        cropped = resized[top : top + crop_h, left : left + crop_w]
        if self.preprocess.channel_order == "RGB":
            cropped = cv2.cvtColor(cropped, cv2.COLOR_BGR2RGB)
        return np.ascontiguousarray(cropped)

    def classify(self, prepared: Sequence[np.ndarray]) -> np.ndarray:
        """Class probabilities [N, classes] (float32, rows sum to 1) for crops from `prepare`."""
        if not prepared:
            return np.zeros((0, len(self.names)), np.float32)
        fixed = self.info.fixed_batch
        if fixed is not None and len(prepared) != fixed:
            if fixed != 1:
                raise ValueError(f"the model takes batches of exactly {fixed}; got {len(prepared)}")
            return np.concatenate([self.classify([one]) for one in prepared])
        batch = (np.stack(prepared).astype(np.float32) - self._mean) * self._inv_std
        if not self._nhwc:
            batch = batch.transpose(0, 3, 1, 2)
        tensor = np.ascontiguousarray(batch, dtype=self._dtype)
        output = self._session.run(None, {self.model.input_name: tensor})[0]
        scores = np.asarray(output, np.float32).reshape(len(prepared), -1)
        return scores if self._is_probabilities(scores) else softmax(scores)

    def _is_probabilities(self, scores: np.ndarray) -> bool:
        if self.output != "auto":
            return self.output == "probabilities"
        return bool(scores.min() >= 0.0 and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    probs: np.ndarray = (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)
    return probs


def _input_layout(model: ModelInfo) -> tuple[str, tuple[int | None, int | None], int | None]:
    """("NCHW" | "NHWC", (H, W) where fixed, the fixed batch size or None)."""
    shape = model.input_shape
    if len(shape) != 4:
        raise ModelLoadError(f"{model.path}: expected an image input [batch, 3, H, W], got {list(shape)}")

    def fixed(dim: int | str | None) -> int | None:
        return dim if isinstance(dim, int) and dim > 0 else None

    batch = fixed(shape[0])
    if fixed(shape[1]) == 3:
        return "NCHW", (fixed(shape[2]), fixed(shape[3])), batch
    if fixed(shape[3]) == 3:
        return "NHWC", (fixed(shape[1]), fixed(shape[2])), batch
    raise ModelLoadError(f"{model.path}: expected 3 colour channels in the input, got {list(shape)}")
