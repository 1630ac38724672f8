"""Class-conditioned refinement: the edge label narrows the classifier's choice to what it refines into.

An edge `dog` may become any of the 118 ImageNet dog breeds but never `tabby`: when the edge label has a
subset in the mapping (`data/coco_to_imagenet.json` by default), the softmax is restricted to that subset and
renormalised, and its best class is the refined label. Without a subset (or without an edge label) the
refined label is the unconditioned best class. Either way the reply also carries the unconditioned top-k.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MAPPING = "coco_to_imagenet.json"


class MappingError(ValueError):
    """The label mapping file is missing or malformed; the message says where."""


@dataclass(frozen=True, slots=True)
class Scored:
    """One class with its probability."""

    label: str
    class_id: int
    score: float


@dataclass(frozen=True, slots=True)
class Refinement:
    """The refiner's answer for one crop."""

    edge_label: str | None
    label: str  # conditioned when `conditioned`, else the unconditioned best
    class_id: int
    score: float  # probability of `label`: within the subset when conditioned
    conditioned: bool
    top_k: tuple[Scored, ...]  # unconditioned, best first


class LabelSubsets:
    """Edge label -> the classifier class indices it refines into (sorted, unique)."""

    def __init__(self, subsets: Mapping[str, Sequence[int]], source: str = "<memory>") -> None:
        self.source = source
        self._subsets = {label: np.asarray(sorted(set(ids)), np.int64) for label, ids in subsets.items()}
        self._by_lower = {label.lower(): label for label in self._subsets}

    @classmethod
    def load(cls, path: Path | None = None, *, num_classes: int | None = None) -> LabelSubsets:
        """Read a mapping file (the packaged one by default); indices are checked against `num_classes`."""
        if path is None:
            text = resources.files("cloud_refiner").joinpath("data", DEFAULT_MAPPING).read_text("utf-8")
            source = f"cloud_refiner/data/{DEFAULT_MAPPING}"
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as error:
                raise MappingError(f"cannot read the label mapping {path}: {error}") from error
            source = str(path)
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise MappingError(f"{source} is not valid JSON: {error}") from error
        raw = document.get("subsets") if isinstance(document, dict) else None
        if not isinstance(raw, dict) or not raw:
            raise MappingError(f"{source}: expected an object with a non-empty 'subsets' object")
        subsets = {label: _expand(source, label, entries, num_classes) for label, entries in raw.items()}
        return cls(subsets, source)

    def __contains__(self, label: object) -> bool:
        return isinstance(label, str) and self.subset(label) is not None

    def __len__(self) -> int:
        return len(self._subsets)

    @property
    def labels(self) -> list[str]:
        return list(self._subsets)

    def subset(self, label: str) -> np.ndarray | None:
        """The class indices of `label` (exact name first, then case-insensitive), or None."""
        found = self._subsets.get(label)
        if found is None:
            key = self._by_lower.get(label.lower())
            found = self._subsets[key] if key is not None else None
        return found

    def as_dict(self) -> dict[str, list[int]]:
        return {label: ids.tolist() for label, ids in self._subsets.items()}


def _expand(source: str, label: str, entries: Any, num_classes: int | None) -> list[int]:
    where = f"{source}: subset {label!r}"
    if not isinstance(entries, list) or not entries:
        raise MappingError(f"{where} must be a non-empty list of class indices and [first, last] ranges")
    ids: list[int] = []
    for entry in entries:
        if isinstance(entry, int) and not isinstance(entry, bool):
            ids.append(entry)
        elif (
            isinstance(entry, list)
            and len(entry) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in entry)
            and entry[0] <= entry[1]
        ):
            ids.extend(range(entry[0], entry[1] + 1))
        else:
            raise MappingError(f"{where}: {entry!r} is neither a class index nor a [first, last] range")
    limit = num_classes if num_classes is not None else 2**31
    bad = [i for i in ids if not 0 <= i < limit]
    if bad:
        raise MappingError(f"{where}: class indices {bad[:5]} are outside 0..{limit - 1}")
    return ids


class Conditioner:
    """Turns a probability row and an edge label into a `Refinement`."""

    def __init__(self, names: Sequence[str], subsets: LabelSubsets | None, top_k: int = 5) -> None:
        self.names = list(names)
        self.subsets = subsets
        self.top_k = max(1, min(top_k, len(self.names)))

    def refine(self, probs: np.ndarray, edge_label: str | None) -> Refinement:
        order = np.argpartition(-probs, self.top_k - 1)[: self.top_k]
        order = order[np.argsort(-probs[order], kind="stable")]
        top = tuple(Scored(self.names[i], int(i), float(probs[i])) for i in order)
        subset = self.subset_of(edge_label)
        if subset is None:
            best = top[0]
            return Refinement(edge_label, best.label, best.class_id, best.score, False, top)
        within = probs[subset]
        total = float(within.sum())
        pick = int(np.argmax(within))
        class_id = int(subset[pick])
        # A subset the classifier gives no mass at all (underflow) still answers, with a uniform share.
        score = float(within[pick]) / total if total > 0 else 1.0 / len(subset)
        return Refinement(edge_label, self.names[class_id], class_id, min(score, 1.0), True, top)

    def subset_of(self, edge_label: str | None) -> np.ndarray | None:
        if edge_label is None or self.subsets is None:
            return None
        return self.subsets.subset(edge_label)
