"""The one interface every scorer implements, and the registry that names them.

A scorer is loaded once on a device, then scores uint8 NHWC batches with their prompts and metadata. The
same classes run inside a reward server and in-process in the trainer, so a scorer is written once.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


@dataclass
class ScoreOutput:
    scores: np.ndarray  # float64, one per image
    info: dict[str, list[Any]] = field(default_factory=dict)  # each list one entry per image


def concat(outputs: list[ScoreOutput]) -> ScoreOutput:
    """Outputs of consecutive batches as one (info keys are the first output's)."""
    scores = np.concatenate([np.asarray(o.scores, dtype=np.float64) for o in outputs])
    return ScoreOutput(scores, {key: sum((list(o.info[key]) for o in outputs), []) for key in outputs[0].info})


class Scorer(ABC):
    name: ClassVar[str]
    description: ClassVar[str]  # what the number means, shown by GET /v1/info
    max_batch: int = 64

    def load(self, device: str = "cpu") -> None:
        """Load weights onto ``device``; called once before the first ``score``."""

    def check(self, prompts: list[str], metadata: list[dict[str, Any]]) -> None:
        """Raise ValueError("metadata.3: ...") for a request this scorer cannot score, before it is batched."""

    @abstractmethod
    def score(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> ScoreOutput:
        """Score a uint8 (N, H, W, 3) batch."""


# name -> "module:Class"; modules load only when their scorer is asked for, so heavy imports stay lazy.
SCORERS: dict[str, str] = {
    "compression": "reward_servers.compression:JpegCompressibility",
    "incompressibility": "reward_servers.compression:JpegIncompressibility",
    "synthetic": "reward_servers.synthetic:SyntheticScorer",
    "aesthetic": "reward_servers.aesthetic:AestheticScorer",
    "clipscore": "reward_servers.clip:ClipScore",
    "pickscore": "reward_servers.clip:PickScore",
    "llava": "reward_servers.llava:LlavaScorer",
}


def scorer_class(name: str) -> type[Scorer]:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose one of {', '.join(sorted(SCORERS))}")
    module, cls = SCORERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create_scorer(name: str, **options: Any) -> Scorer:
    return scorer_class(name)(**options)
