"""The one interface every scorer implements, and the registry that names them.

A scorer is loaded once on a device, then scores uint8 NHWC batches with their prompts and metadata. The
same classes run inside a reward server and in-process in the trainer, so a scorer is written once.

A scorer is named by a built-in name (``SCORERS``), by a name another package registers under the
``diffusion_rl.scorers`` entry point, or as ``module:attribute``. The attribute is a ``Scorer`` class, or a
plain reward function ``fn(images, prompts, metadata) -> (scores, info)`` as ddpo-pytorch and TRL take
(``info`` a dict of per-image lists, or omitted); ``FunctionScorer`` makes the function a scorer, so the same
user code runs in the trainer's process or behind ``reward-server --model module:fn``.
"""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np


# Given to every transformers image processor: left to guess, it takes an image 1, 3 or 4 pixels high for
# channels-first (a 3x20 crop normalised as 20 pixels of 3 channels), and a 1-pixel-high one fails.
CHANNELS_LAST = {"input_data_format": "channels_last"}
MAX_ASPECT = 4  # see central


def central(image, h_axis: int = 0, w_axis: int = 1, ratio: int = MAX_ASPECT):
    """The centre of ``image`` (numpy or torch, any layout) with its longer side cut to ``ratio`` times the
    shorter. CLIP-style preprocessing resizes the shorter side to the model's size and keeps the centre square:
    a 1 x 1,048,576 image would first become 224 x 234,881,024 pixels (150 GB); cut first, it keeps the same
    centre (up to a pixel of rounding), and images of aspect ratio up to 4 are untouched."""
    h, w = image.shape[h_axis], image.shape[w_axis]
    keep_h, keep_w = min(h, ratio * w), min(w, ratio * h)
    index = [slice(None)] * image.ndim
    index[h_axis] = slice((h - keep_h) // 2, (h - keep_h) // 2 + keep_h)
    index[w_axis] = slice((w - keep_w) // 2, (w - keep_w) // 2 + keep_w)
    return image[tuple(index)]


@dataclass
class ScoreOutput:
    scores: np.ndarray  # float64, one per image
    info: dict[str, list[Any]] = field(default_factory=dict)  # each list one entry per image
    gradients: np.ndarray | None = None  # score_grad: float32 NHWC, d score_i / d image_i


def concat(outputs: list[ScoreOutput]) -> ScoreOutput:
    """Outputs of consecutive batches as one (info keys are the first output's)."""
    scores = np.concatenate([np.asarray(o.scores, dtype=np.float64) for o in outputs])
    gradients = np.concatenate([o.gradients for o in outputs]) if outputs[0].gradients is not None else None
    return ScoreOutput(
        scores, {key: sum((list(o.info[key]) for o in outputs), []) for key in outputs[0].info}, gradients
    )


def differentiable(scorer) -> bool:
    """Whether the scorer has a tensor path: ``score_tensor(images (N, 3, H, W) in [0, 1], prompts, metadata)``
    returning differentiable scores (aesthetic, clipscore, pickscore)."""
    return callable(getattr(scorer, "score_tensor", None))


def score_grad(scorer, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> ScoreOutput:
    """Scores of float NHWC images in [0, 1] and the gradient of each score with respect to its own image
    (the scores are independent per image, so one backward of their sum gives every gradient at once)."""
    import torch

    pixels = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2).requires_grad_()
    scores = scorer.score_tensor(pixels, prompts, metadata)
    (gradient,) = torch.autograd.grad(scores.sum(), pixels)
    return ScoreOutput(scores.detach().double().cpu().numpy(), {}, gradient.permute(0, 2, 3, 1).float().cpu().numpy())


class Scorer(ABC):
    name: ClassVar[str]
    description: ClassVar[str]  # what the number means, shown by GET /v1/info
    max_batch: int = 64
    # Characters per prompt a server takes (a 422 naming the prompt past it): what one request can cost is
    # bounded by more than the body limit. Captions are far shorter; a scorer whose work grows with the
    # prompt sets its own (OCR's edit distance).
    max_prompt_chars: int = 10_000
    # The longest image side a scorer takes (None: any the protocol allows, 1 pixel up to 1 Mpixel on one
    # side): past it a server answers 422 naming the image, the one rule every scorer shares. Scorers that
    # resize keep every side at 1 pixel at least, so that no shape reaches a size of 0.
    max_side: int | None = None
    # Videos (scorers/video.py). An image scorer scores a video frame by frame, the server pooling the frame
    # scores per video, when a frame's score does not depend on the other images of its batch (not so for the
    # VLM judge's pairwise mode). A scorer with ``score_videos`` scores whole videos itself (temporal
    # consistency), of at least ``min_frames`` frames; one that takes videos only sets ``scores_images`` False.
    per_frame: bool = True
    scores_images: ClassVar[bool] = True
    min_frames: ClassVar[int] = 1

    def load(self, device: str = "cpu") -> None:
        """Load weights onto ``device``; called once before the first ``score``."""

    def requirements(self) -> dict[str, tuple[str, str | None, str]]:
        """What ``load`` will need, by option name: ``(kind, ref, what)`` with kind "model" (an id or folder)
        or "file", ``ref`` None when the option must be given, ``what`` naming it for people. Checked before
        anything loads (``scorers.hub.problem``)."""
        return {}

    def problems(self) -> dict[str, str]:
        """What would stop the scorer that only asking outside can tell (a judge server unreachable, its model
        not served), by option name; checked by the trainer's preflight before anything loads."""
        return {}

    def check(self, prompts: list[str], metadata: list[dict[str, Any]]) -> None:
        """Raise ValueError("metadata.3: ...") for a request this scorer cannot score, before it is batched."""

    @abstractmethod
    def score(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> ScoreOutput:
        """Score a uint8 (N, H, W, 3) batch."""


# name -> "module:Class"; modules load only when their scorer is asked for, so heavy imports stay lazy.
SCORERS: dict[str, str] = {
    "compression": "scorers.compression:JpegCompressibility",
    "incompressibility": "scorers.compression:JpegIncompressibility",
    "synthetic": "scorers.synthetic:SyntheticScorer",
    "aesthetic": "scorers.aesthetic:AestheticScorer",
    "clipscore": "scorers.clip:ClipScore",
    "pickscore": "scorers.clip:PickScore",
    "hpsv2": "scorers.hps:HPSv2",
    "imagereward": "scorers.imagereward:ImageRewardScorer",
    "llava": "scorers.llava:LlavaScorer",
    "shapes": "scorers.shapes:ShapesVerifier",
    "geneval": "scorers.geneval:GenEvalScorer",
    "ocr": "scorers.ocr:OcrScorer",
    "vlm": "scorers.vlm:VlmScorer",
    "temporal": "scorers.temporal:TemporalConsistency",
}


ENTRY_POINTS = "diffusion_rl.scorers"


def registered() -> dict[str, str]:
    """Every scorer name: the built-in ones and those installed packages register (built-ins win a clash)."""
    from importlib.metadata import entry_points

    return {**{ep.name: ep.value for ep in entry_points(group=ENTRY_POINTS)}, **SCORERS}


def scorer_target(name: str) -> Any:
    """The Scorer class or reward function ``name`` stands for; ValueError saying why when there is none."""
    names = registered()
    target = names.get(name) or (name if ":" in name else None)
    if target is None:
        raise ValueError(
            f"unknown scorer {name!r}; choose one of {', '.join(sorted(names))}, or name your own as module:function"
        )
    obj = import_attribute(target, f"scorer {name!r}")
    if not (isinstance(obj, type) and issubclass(obj, Scorer)) and not callable(obj):
        raise ValueError(f"scorer {name!r}: {target} is neither a Scorer class nor a function")
    return obj


def import_attribute(target: str, what: str) -> Any:
    """``module:attribute`` (dots allowed in both) imported; ValueError starting with ``what`` otherwise."""
    module, sep, attribute = target.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"{what}: {target!r} is not module:attribute")
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"{what}: cannot import module {module!r} ({exc})") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what}: module {module!r} has no {attribute!r}")
        obj = getattr(obj, part)
    return obj


def scorer_options(name: str) -> set[str]:
    """The options ``create_scorer(name, **options)`` takes (a function takes none)."""
    target = scorer_target(name)
    if not (isinstance(target, type) and issubclass(target, Scorer)):
        return set()
    return set(inspect.signature(target.__init__).parameters) - {"self", "args", "kwargs"}


def create_scorer(name: str, **options: Any) -> Scorer:
    target = scorer_target(name)
    if isinstance(target, type) and issubclass(target, Scorer):
        return target(**options)
    if options:
        raise ValueError(f"scorer {name!r} is a function: it takes no options (got {', '.join(sorted(options))})")
    return FunctionScorer(target, name)


def torch_images(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a reward function that takes images as TRL passes them: a float torch tensor in [0, 1], (N, 3, H, W).

    Unmarked functions get what every scorer gets: uint8 numpy, (N, H, W, 3).
    """
    fn.images = "torch"
    return fn


class FunctionScorer(Scorer):
    """A reward function ``fn(images, prompts, metadata) -> (scores, info)`` (or ``-> scores``) as a scorer.

    ``images`` are uint8 numpy (N, H, W, 3), or a float torch tensor in [0, 1] (N, 3, H, W) for a function
    marked with ``torch_images``. ``fn`` may also return a ``concurrent.futures.Future`` of its result; the
    scorer waits for it. Scores may be any sequence of numbers (a list, numpy, a torch tensor).
    """

    description = "a reward function"

    def __init__(self, fn: Callable[..., Any], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "reward_fn")
        self.description = (inspect.getdoc(fn) or "a reward function").splitlines()[0]

    def score(self, images, prompts, metadata) -> ScoreOutput:
        if getattr(self.fn, "images", "numpy") == "torch":
            import torch

            images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
        result = self.fn(images, prompts, metadata)
        if hasattr(result, "result") and callable(result.result):  # a Future
            result = result.result()
        has_info = isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], (dict, type(None)))
        scores, info = result if has_info else (result, {})
        if hasattr(scores, "detach"):  # a torch tensor, perhaps on a GPU
            scores = scores.detach().float().cpu().numpy()
        return ScoreOutput(np.asarray(scores, dtype=np.float64), dict(info or {}))
