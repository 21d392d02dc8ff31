"""The model families: one file per diffusers pipeline the trainer trains (``sd1.py`` SD1.x/SD2.x, ``sdxl.py``,
``sd3.py``, ``flux.py``), the step math they share (``ddim.py`` DDIM, ``flow.py`` Flow-GRPO's flow-matching
SDE and CPS steps, ``zero_t5.py`` SD3 without T5), loading a family and making its denoiser trainable
(``models.py``: ``load_family``, ``FAMILIES``, ``TINY``, ``SHIPPED``), the tiny test pipelines
(``tiny_pipeline.py``) and the pretraining of the shipped tiny-shapes models (``shapes_model.py``).

``Family`` below is what the rollout, the algorithms and ``trainer/run.py`` call on a family; each family class
has all of it without inheriting from it (tests/test_families.py checks that it cannot drift).

This file imports no family: ``trainer.loss`` imports ``trainer.families.ddim``, and ``sd1.py`` imports
``trainer.loss``, so a package that loaded its families on import would be an import cycle. Import them from
their modules (``from trainer.families.models import load_family``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np
    import torch

    from trainer.config import Config


@runtime_checkable
class Family(Protocol):
    """A model family: a loaded diffusers pipeline behind the calls the trainer makes. ``cond`` and ``negative``
    are what ``encode_prompts`` returns (a tensor for SD1, a dict of tensors for the others)."""

    pipeline_class: ClassVar[str]  # the diffusers pipeline class name (model_index.json's _class_name)
    denoiser_name: ClassVar[str]  # the trained pipeline component ("unet", "transformer")
    pipe: Any  # the diffusers pipeline

    @classmethod
    def load(cls, path: str, cfg: Config, dtype: torch.dtype) -> Family: ...

    @property
    def denoiser(self) -> torch.nn.Module: ...

    def frozen_modules(self) -> list[torch.nn.Module]: ...

    def native_resolution(self) -> int: ...

    # -- conditioning and prediction
    def encode_prompts(self, prompts: list[str], resolution: int | None = None) -> Any: ...

    def predict(
        self,
        model: Any,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Any,
        negative: Any,
        guidance_scale: float,
    ) -> torch.Tensor: ...

    # -- the stochastic step
    def timesteps(self, num_steps: int, device: Any) -> torch.Tensor: ...

    def initial_latents(self, n: int, resolution: int, generator: Any, device: Any) -> torch.Tensor: ...

    def step(
        self, output: torch.Tensor, index: torch.Tensor | int, latents: torch.Tensor, eta: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def log_prob(self, x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor: ...

    def kl(
        self, mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor: ...

    def predicted_x0(self, output: torch.Tensor, index: torch.Tensor | int, latents: torch.Tensor) -> torch.Tensor: ...

    # -- the training objectives
    def noised(self, latents: torch.Tensor, noise: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def noised_at(
        self, latents: torch.Tensor, noise: torch.Tensor, index: torch.Tensor
    ) -> tuple[torch.Tensor, ...]: ...

    # -- pixels
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def to_uint8(self, latents: torch.Tensor) -> np.ndarray: ...

    def encode(self, images: torch.Tensor, generator: Any = None) -> torch.Tensor: ...

    # -- saving
    def save_lora(self, layers: dict[str, torch.Tensor], folder: Path) -> None: ...
