"""The settings groups of the algorithms beside DDPO: ``dpo`` (Diffusion-DPO) and ``refl`` (ReFL, DRaFT,
AlignProp). Part of ``trainer.config.Config``; in a module of their own to keep
trainer/config/__init__.py readable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from trainer.config.group import _Group


class _Steps(_Group):
    """The settings of the step loop (trainer/steps.py) that the algorithms counted in optimizer steps share."""

    max_train_steps: int = Field(100, gt=0, description="optimizer steps")
    checkpointing_steps: int = Field(
        500, ge=0, description="checkpoint every this many steps (and at the end); 0: at the end only"
    )
    log_every: int = Field(1, gt=0, description="log metrics every this many steps")


class DPOConfig(_Steps):
    """Diffusion-DPO (``--algorithm dpo``): preference pairs, the loss's beta, the data pipeline; counted in
    optimizer steps. The reference is the base model: with LoRA the adapter-disabled denoiser, with full
    finetuning a frozen copy of it."""

    dataset: str | None = Field(
        None,
        description="preference pairs: a folder of Pick-a-Pic-layout parquet files "
        "(caption, jpg_0, jpg_1, label_0), a folder with pairs.jsonl, or a hub dataset id",
    )
    split: str = "train"
    cache_dir: Path | None = Field(None, description="where the datasets library caches a hub dataset")
    check_rows: int = Field(
        10_000,
        ge=0,
        description="pairs checked in full before any model loads (their images "
        "opened and decoded; a pairs.jsonl's lines are all parsed); later ones as they are read, "
        "the first bad one stopping the run before it is trained on",
    )
    allow_outside_paths: bool = Field(
        False, description="let image paths point outside the dataset folder (absolute, or ../); refused by default"
    )
    beta: float = Field(5000.0, gt=0, description="the KL weight beta (5000 for SD1.5 and SDXL)")
    sft: bool = Field(False, description="supervised finetuning instead: the denoising MSE on the winners only")
    reference: Literal["base", "ema"] = Field(
        "base",
        description="base: the model before training (LoRA: the "
        "adapters switched off; full finetuning: a frozen copy); ema: full "
        "finetuning's moving average of the policy (train.ema_decay, whose "
        "average is also the saved model), a reference that follows the policy",
    )
    scale_lr: bool = Field(
        False,
        description="multiply train.learning_rate by the effective batch (batch x "
        "accumulation x processes), as Diffusion-DPO's --scale_lr",
    )
    random_crop: bool = Field(False, description="random instead of centre crops")
    hflip: bool = Field(True, description="random horizontal flips")
    proportion_empty_prompts: float = Field(0.2, ge=0, le=1, description='share of captions replaced by ""')
    dataloader_num_workers: int = Field(0, ge=0, description="processes decoding and preprocessing pairs")
    relabel: bool = Field(
        False,
        description="choose each pair's winner with the reward (reward.scorer or "
        "reward.url) as it trains, instead of label_0 (Diffusion-DPO's --choice_model)",
    )
    online: bool = Field(
        False,
        description="rounds of pairs sampled from the current policy (images per prompt "
        "of prompt.fn, the best and the worst paired) and labelled by the reward, in place of dpo.dataset",
    )
    online_pairs: int = Field(64, gt=0, description="pairs sampled per round, per process")
    online_images_per_prompt: int = Field(
        2,
        ge=2,
        description="images sampled per prompt of a round; its best- "
        "and worst-scored make the pair (fewer ties than two)",
    )
    online_epochs: int = Field(
        1,
        gt=0,
        description="passes over each round's pairs (reshuffled after the first) before the next round is sampled",
    )

    @model_validator(mode="after")
    def _dataset(self) -> "DPOConfig":
        if self.dataset is not None and "/" not in self.dataset and not Path(self.dataset).exists():
            raise ValueError(f"dataset: {self.dataset} is neither a folder nor a hub dataset id (owner/name)")
        return self


class ReFLConfig(_Steps):
    """Differentiable rewards (``--algorithm refl``): the reward's gradient through the VAE decoder and the
    last denoising step(s); counted in optimizer steps. The reward is ``reward.scorer`` in process (one with
    a tensor path: aesthetic, clipscore, pickscore, hpsv2, imagereward) or ``reward.url``, a server's /v1/score_grad."""

    mode: Literal["refl", "draft", "alignprop"] = Field(
        "refl",
        description="refl: one step with grad at a step "
        "drawn from [mid_low, mid_high], its predicted x0 scored "
        "(ImageReward's ReFL); draft: the whole sampler, grad through "
        "the last draft_k steps (DRaFT-K); alignprop: grad through "
        "the last k steps, k drawn from 1..num_steps, each step "
        "checkpointed (AlignProp)",
    )
    num_steps: int = Field(40, gt=0, description="sampler steps (DDIM eta 0 / the flow ODE)")
    mid_low: int = Field(30, ge=0, description="refl: the step with grad is drawn uniformly from mid_low..mid_high")
    mid_high: int = Field(39, ge=0)
    draft_k: int = Field(1, gt=0, description="draft: steps with grad at the end of the sampler")
    guidance_scale: float = Field(1.0, ge=1.0, description="1: no CFG (ReFL encodes the prompt alone)")
    margin: float = Field(2.0, description="refl: loss relu(margin - reward); draft/alignprop: loss -reward")
    grad_scale: float = Field(1e-3, ge=0, description="the loss is multiplied by this")
    pretrain_data: str | None = Field(
        None,
        description="real images with captions for ReFL's alternating "
        "pre-training step (the plain denoising loss, which keeps the model near "
        "the data): a folder with metadata.jsonl (file_name, text), a folder of "
        "parquet files with image and caption columns, or a preference dataset "
        "(its winners)",
    )
    pretrain_check_rows: int = Field(10_000, ge=0, description="as dpo.check_rows, for refl.pretrain_data")
    pretrain_allow_outside_paths: bool = Field(False, description="as dpo.allow_outside_paths, for refl.pretrain_data")
    pretrain_every: int = Field(1, gt=0, description="a pre-training optimizer step after every this many reward steps")
    pretrain_weight: float = Field(1.0, ge=0, description="the pre-training loss is multiplied by this")

    @model_validator(mode="after")
    def _steps(self) -> "ReFLConfig":
        if not self.mid_low <= self.mid_high < self.num_steps:
            raise ValueError(
                f"mid_low ({self.mid_low}) <= mid_high ({self.mid_high}) < num_steps ({self.num_steps}) must hold"
            )
        if self.draft_k > self.num_steps:
            raise ValueError(f"draft_k ({self.draft_k}) must not exceed num_steps ({self.num_steps})")
        return self


class NFTConfig(_Group):
    """DiffusionNFT (``--algorithm nft``; Zheng et al. 2025, github.com/NVlabs/DiffusionNFT): rollouts at
    sample.eta (0: the family's deterministic sampler) keep only clean latents and rewards; training is the
    denoising loss on them, re-noised at train.timestep_fraction of the sampler's own steps, pulled toward the
    better samples and away from the worse through an old policy. The KL to the base model is train.kl_coef
    (DiffusionNFT's config.train.beta, 1e-4: mean squared difference of the predictions)."""

    beta: float = Field(
        1.0,
        gt=0,
        description="the mixing strength b of the implicit positive and negative "
        "policies (DiffusionNFT's config.beta: 1.0; 0.1 for OCR and several rewards); not a KL",
    )
    old_decay_rate: float = Field(
        0.001,
        ge=0,
        description="the old policy moves toward the current weights once "
        "per epoch, old <- d old + (1 - d) current, d = min(rate x optimizer steps, "
        "old_decay_max) (DiffusionNFT: 0.001)",
    )
    old_decay_max: float = Field(0.5, ge=0, lt=1, description="the old policy's largest decay d (DiffusionNFT: 0.5)")
    old_decay_flat_steps: int = Field(
        0,
        ge=0,
        description="optimizer steps before the decay starts to grow, d = 0 "
        "until then (DiffusionNFT's OCR schedule: 75, rate 0.0075, max 0.999)",
    )
    rollout_policy: Literal["old", "current"] = Field(
        "old",
        description="which weights sample each epoch's images: old, the lagging old policy (DiffusionNFT samples "
        "with its old adapter); current, the weights being trained. The same while the decay is 0",
    )

    def old_decay(self, step: int) -> float:
        """DiffusionNFT's return_decay: 0 for the flat steps, then rising by old_decay_rate per step."""
        return (
            0.0
            if step < self.old_decay_flat_steps
            else min((step - self.old_decay_flat_steps) * self.old_decay_rate, self.old_decay_max)
        )


class AWMConfig(_Group):
    """Advantage Weighted Matching (``--algorithm awm``; Xue et al. 2025, github.com/scxue/advantage_weighted_matching):
    rollouts and training steps as DiffusionNFT's; the loss is the pretraining loss on the clean latents
    weighted by the clipped advantage, with two KL terms: train.kl_coef to the base model (AWM's beta: 0.001
    GenEval, 0.003 OCR, 1e-4 PickScore) and awm.ema_kl_coef to a lagging average of the policy."""

    power: float = Field(0.25, gt=0, description="p of the log-likelihood proxy -t ((l + 1e-10)^p - 1e-10^p) / p")
    ema_kl_coef: float = Field(
        1.0,
        ge=0,
        description="weight of mean((pred - pred_ema)^2), the KL to the lagging "
        "average (AWM: 1.0; Flow-Factory: AWM collapses without it)",
    )
    ema_decay_rate: float = Field(
        0.001,
        ge=0,
        description="the average follows the weights once per epoch with "
        "decay min(rate x optimizer steps, ema_decay_max) (AWM: 0.001)",
    )
    ema_decay_max: float = Field(0.3, ge=0, lt=1, description="the average's largest decay (AWM: 0.3)")

    def old_decay(self, step: int) -> float:
        """The lagging average's decay after ``step`` optimizer steps."""
        return min(step * self.ema_decay_rate, self.ema_decay_max)
