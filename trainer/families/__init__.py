"""The model families: one file per diffusers pipeline the trainer trains (``sd1.py`` SD1.x/SD2.x, ``sdxl.py``,
``sd3.py``, ``flux.py``, ``flux2.py``, ``qwenimage.py``, ``zimage.py``, ``wan.py``: video), the sampler dynamics
they compose (``ddim.py``'s ``DDIM``, ``flow.py``'s ``FlowMatching``: Flow-GRPO's flow-matching SDE and CPS steps),
the VAE code they share (``vae.py``), ``zero_t5.py`` (SD3 without T5), loading a family and making its denoiser
trainable (``models.py``: ``load_family``, ``FAMILIES``, ``TINY``, ``SHIPPED``) and the tiny test pipelines
(``tiny_pipeline.py``, ``tiny_flux2.py``, ``tiny_qwenimage.py``, ``tiny_zimage.py``, ``tiny_wan.py``). The
pretraining of the shipped tiny-shapes models is a tool, trainer/tools/shapes_model.py.

A family is the model: conditioning, prediction, the latents' shape, loading and saving (``Family`` below). The
sampler's dynamics are not the model's: each family holds one ``Dynamics`` object, ``family.dynamics``, chosen
when it is built (a DDIM for the UNet families, a FlowMatching for the flow-matching ones), and one ``VAE``,
``family.vae``; the rollout and the algorithms call ``family.dynamics.step(...)``, ``family.vae.decode(...)``.
Each class has all of its protocol without inheriting from it (tests/test_families.py checks that it cannot
drift, and that no family borrows another's bound methods).

This file imports no family, so that importing one module of the package (preflight's ``trainer.families.ddim``)
loads that module alone: import them from their modules (``from trainer.families.models import load_family``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from trainer.config import Config
    from trainer.families.vae import VAE


@runtime_checkable
class Dynamics(Protocol):
    """The sampler's dynamics on the pipeline's scheduler (trainer/families/ddim.py's DDIM, flow.py's
    FlowMatching): the schedule, the initial noise, one stochastic step's Gaussian with its log-prob and KL, the
    x0 a prediction implies, and the forward process the non-rollout objectives train on. ``index`` is a step of
    the schedule ``timesteps`` last set (a scalar or one per sample)."""

    scheduler: Any  # the pipeline's own diffusers scheduler

    def timesteps(self, num_steps: int, device: Any) -> torch.Tensor: ...

    def prior(self, shape: tuple[int, ...], generator: Any, device: Any) -> torch.Tensor: ...

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


@runtime_checkable
class Family(Protocol):
    """A model family: a loaded diffusers pipeline behind the calls the trainer makes. ``cond`` and ``negative``
    are what ``encode_prompts`` returns (a tensor for SD1, a dict of tensors for the others)."""

    pipeline_class: ClassVar[str]  # the diffusers pipeline class name (model_index.json's _class_name)
    denoiser_name: ClassVar[str]  # the trained pipeline component ("unet", "transformer")
    shard_blocks: ClassVar[tuple[str, ...]]  # the denoiser's block classes, each one unit of run.sharding
    pipe: Any  # the diffusers pipeline
    dynamics: Dynamics  # the sampler's, on pipe.scheduler
    vae: VAE  # latents to images in [0, 1] and back, on pipe.vae

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

    # -- the sampler's start: the model's latent shape, the dynamics' noise
    def initial_latents(self, n: int, resolution: int, generator: Any, device: Any) -> torch.Tensor: ...

    # -- saving
    def save_lora(self, layers: dict[str, torch.Tensor], folder: Path) -> None: ...


def text_encoders(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's text encoders by component name (text_encoder, text_encoder_2, ...), the absent left out."""
    return {name: m for name, m in pipe.components.items() if name.startswith("text_encoder") and m is not None}
