"""The ``dpo`` settings group (Diffusion-DPO), part of trainer.config.Config."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from trainer.groups import _Steps


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
    # Named beta as in Diffusion-DPO (Wallace et al. 2023, its --beta_dpo), so that its recipes port unchanged; a
    # KL weight, unlike nft.beta (a mixing coefficient) and train.kl_coef (a KL penalty added to the loss).
    beta: float = Field(
        5000.0,
        gt=0,
        description="a KL weight: Diffusion-DPO's beta_dpo, the strength of the implicit KL to the reference "
        "(5000 for SD1.5 and SDXL); not nft.beta, a mixing coefficient",
    )
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
