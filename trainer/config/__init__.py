"""Run configuration, grouped like ddpo-pytorch's, and the batch arithmetic checked before any model loads.

Every field can be overridden on the command line with its dotted path: ``--train.learning_rate 3e-4``.
The defaults are the ``tiny`` run: an embedded random-init pipeline on CPU that finishes in minutes.

This package: ``Config`` and its sample, train and prompt groups here; ``run.py`` the run and pretrained groups,
``reward.py`` the reward group, the algorithms' groups (each algorithm's own
group is in its folder, trainer/algorithms/<name>/settings.py), ``renamed.py`` the old spellings of moved settings,
``group.py`` the base of every group and the reading of ``--config`` files, ``presets.py`` the named presets
(``--preset``) and ``recipes.py`` the papers' recipes among them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from trainer.algorithms import ALGORITHMS
from trainer.algorithms.ddpo.settings import DDPOConfig
from trainer.algorithms.dgpo.settings import DGPOConfig
from trainer.algorithms.dpo.settings import DPOConfig
from trainer.algorithms.forward.settings import AWMConfig, NFTConfig
from trainer.algorithms.refl.settings import ReFLConfig
from trainer.config.group import _Group, read_settings_file
from trainer.config.renamed import moved_settings
from trainer.config.reward import RewardComponent, RewardConfig
from trainer.config.run import PretrainedConfig, RunConfig

__all__ = ["Config", "RewardComponent", "RewardConfig"]  # what the rest of the project imports from here


class SampleConfig(_Group):
    num_steps: int = Field(20, gt=0, description="sampler steps per image")
    eta: float = Field(
        1.0,
        ge=0,
        description="the policy's noise: DDIM's eta, or Flow-GRPO's SDE noise level for "
        "flow-matching models (0.7 in its SD3.5 runs); 0 gives a degenerate policy",
    )
    sde_type: Literal["sde", "cps"] = Field(
        "sde",
        description="flow-matching models: Flow-GRPO's SDE step, or its "
        "coefficients-preserving variant (cps, used by its Fast runs)",
    )
    eval_num_steps: int | None = Field(
        None,
        gt=0,
        description="steps of the deterministic evaluation sampler (run.eval_every); default sample.num_steps",
    )
    guidance_scale: float = Field(5.0, ge=1.0)
    batch_size: int = Field(8, gt=0, description="images per sampling batch, per process")
    num_batches_per_epoch: int = Field(4, gt=0)
    resolution: int | None = Field(None, gt=0, description="pixels; default: the model's native size")
    # the settings of video and two-expert families (Wan: trainer/families/wan.py); the others refuse them at load
    num_frames: int | None = Field(None, gt=0, description="video families: frames per video; default the pipeline's")
    width: int | None = Field(
        None, gt=0, description="video families: pixels wide, sample.resolution the height; default square"
    )
    guidance_scale_2: float | None = Field(
        None, ge=1.0, description="Wan2.2's low-noise expert's guidance; default sample.guidance_scale"
    )
    images_per_prompt: int = Field(
        1,
        ge=1,
        description="K > 1: each prompt sampled K times in a row (a group may "
        "span batches), advantages normalised within its group (Flow-GRPO)",
    )
    same_noise_per_group: bool = Field(
        False,
        description="a group's images start from the same initial noise "
        "(Flow-GRPO's same_latent): they differ only by the sampler's noise",
    )

    @model_validator(mode="after")
    def _groups_fit(self) -> "SampleConfig":
        per_epoch = self.batch_size * self.num_batches_per_epoch
        if per_epoch % self.images_per_prompt:
            raise ValueError(
                f"images_per_prompt: {self.images_per_prompt} must divide a process's samples per epoch, "
                f"sample.batch_size x sample.num_batches_per_epoch = {per_epoch}"
            )
        return self


class TrainConfig(_Group):
    batch_size: int = Field(4, gt=0, description="samples per training step, per process")
    learning_rate: float = Field(5e-3, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warm-up")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-4, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    num_inner_epochs: int = Field(1, gt=0)
    adv_clip_max: float = Field(5.0, gt=0)
    timestep_fraction: float = Field(
        0.5, gt=0, le=1.0, description="train on this share of each trajectory's stochastic steps"
    )
    timestep_selection: Literal["random", "first", "stratified"] = Field(
        "random",
        description="which of the stochastic steps train.timestep_fraction picks: random, a permutation "
        "per sample (ddpo-pytorch, DiffusionNFT); first, the first ones in sampling order (Flow-GRPO: 0.99 of 10 "
        "steps trains 0-8); stratified, one from each of k strata of steps 1 to int(train.timestep_span x steps) (AWM)",
    )
    timestep_span: float = Field(
        0.9,
        gt=0,
        le=1.0,
        description="stratified: the strata cover steps 1 to int(span x steps) of the schedule, the pure-noise "
        "step 0 never trained (AWM's timestep_fraction, 0.9; ours is the share of steps trained)",
    )
    timestep_shared: bool = Field(
        False,
        description="one draw of the trained steps per training batch, shared by its samples (AWM's code); "
        "false: each sample its own",
    )
    timesteps_per_forward: int = Field(
        0,
        ge=0,
        description="trained timesteps that go through the denoiser "
        "together, a batch of K x train.batch_size (the same loss and gradient); 0: all "
        "of them on CPU, as many as fit on a CUDA GPU (measured on the first batch)",
    )
    lora: bool = Field(True, description="train LoRA adapters; false trains the whole UNet")
    lora_rank: int = Field(16, gt=0)
    lora_alpha: float = Field(16.0, gt=0)
    lora_targets: list[str] = Field(
        [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "proj_in",
            "proj_out",
            "conv1",
            "conv2",
            "conv_shortcut",
            "conv_in",
            "conv_out",
            "time_emb_proj",
        ],
        description="UNet module names that get adapters; attention-only LoRA is inert on a random-init UNet",
    )
    gradient_checkpointing: bool = Field(False, description="recompute UNet activations in backward: less memory")
    use_8bit_adam: bool = Field(False, description="bitsandbytes' AdamW8bit (needs a CUDA GPU)")
    use_adafactor: bool = Field(
        False,
        description="transformers' Adafactor at train.learning_rate, in place of AdamW "
        "(less memory: Diffusion-DPO's choice for SDXL)",
    )
    kl_coef: float = Field(
        0.0,
        ge=0,
        description="KL penalty toward the base model (LoRA: the denoiser with its adapters off; full "
        "finetuning: a frozen copy of it as loaded): "
        "flow models, Flow-GRPO's beta in its convention (mean-squared mean difference over "
        "2 std_t^2, std_t without sqrt(-dt)); DDIM, the exact KL of the steps' Gaussians; also "
        "DiffusionNFT's config.train.beta and AWM's beta (not dpo.beta nor nft.beta)",
    )
    norm_guard_coef: float = Field(
        0.0,
        ge=0,
        description="NormGuard's hinge (arXiv 2606.27771: RL finetuning inflates the velocity's norm 5-15% over "
        "the base's): coef x mean over samples of max(0, rms(v_policy) - rms(v_base)), on the same noisy "
        "inputs, added to the velocity-local losses (nft, awm, dgpo); 0: off. The paper's exact form is not "
        "published: ours is per sample, root-mean-square over its elements, unsquared",
    )
    ema_decay: float = Field(
        0.0, ge=0, lt=1, description="EMA of trainable weights (0: off); saved weights are the EMA"
    )
    group_std: Literal["group", "global"] = Field(
        "group", description="with images_per_prompt > 1: divide by each group's std or by the whole epoch's"
    )
    group_by: Literal["group", "prompt"] = Field(
        "group",
        description="the images whose mean is each one's baseline: group, the sample.images_per_prompt images "
        "sampled together (1: the whole epoch); prompt, every image of the same prompt string in the "
        "epoch (flow_grpo's, DiffusionNFT's and AWM's PerPromptStatTracker, cleared each epoch; their std adds "
        "1e-4, ours 1e-6)",
    )
    per_prompt_stat_tracking: bool = Field(False, description="normalise rewards per exact prompt string")
    stat_buffer_size: int = Field(16, gt=0)
    stat_min_count: int = Field(16, gt=0)

    @model_validator(mode="after")
    def _requirements(self) -> "TrainConfig":
        if self.use_8bit_adam:
            import importlib.util

            import torch

            if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
                raise ValueError(
                    "use_8bit_adam: needs `pip install bitsandbytes` and a CUDA GPU; drop the flag to use AdamW"
                )
        return self


class PromptConfig(_Group):
    fn: str = Field(
        "simple_animals",
        description="simple_animals, imagenet_all, imagenet_animals, imagenet_dogs, "
        "nouns_activities, counting, from_file, or your own module:function (see trainer/prompts.py)",
    )
    path: Path | None = Field(None, description="for from_file: one prompt per line", validate_default=True)
    eval_path: Path | None = Field(
        None,
        description="held-out prompts for run.eval_every, one per line; default: "
        "prompt.eval_count draws of prompt.fn from a fixed seed",
    )
    eval_count: int = Field(16, gt=0)

    @field_validator("eval_path")
    @classmethod
    def _eval_path(cls, path: Path | None) -> Path | None:
        return _prompt_file(path)

    @field_validator("fn")
    @classmethod
    def _known(cls, fn: str) -> str:
        from trainer.prompts import PROMPT_FNS

        if ":" in fn:
            from scorers.scorer import import_attribute

            import_attribute(fn, repr(fn))  # importable now, not after the model has loaded
        elif fn not in {*PROMPT_FNS, "from_file"}:
            raise ValueError(
                f"unknown prompt set {fn!r}; choose one of {', '.join([*PROMPT_FNS, 'from_file'])}, "
                "or name your own as module:function"
            )
        return fn

    @field_validator("path")
    @classmethod
    def _path(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        if info.data.get("fn") == "from_file" and path is None:
            raise ValueError("from_file needs an existing file, got None")
        return _prompt_file(path)


def _prompt_file(path: Path | None) -> Path | None:
    from trainer.prompts import checked_file

    return checked_file(path)


class Config(BaseSettings):
    """Reward finetuning of a text-to-image diffusion model: DDPO / Flow-GRPO (ddpo), Diffusion-DPO on preference
    pairs (dpo), ReFL / DRaFT / AlignProp on a differentiable reward (refl), DiffusionNFT (nft), AWM (awm) and
    DGPO (dgpo)."""

    model_config = SettingsConfigDict(
        extra="forbid",
        hide_input_in_errors=True,  # as every group's (trainer/config/group.py)
        cli_prog_name="python -m trainer",
        cli_implicit_flags=True,
        cli_avoid_json=True,
        env_prefix="DIFFUSION_RL_",
        env_nested_delimiter="__",  # e.g. DIFFUSION_RL_REWARD__TOKEN for secrets
    )

    preset: str = Field(
        "tiny",
        description="starting point: shapes-sd3-nft, shapes-nft, shapes-awm, shapes, shapes-nokl, shapes-ddpo, "
        "tiny, sd15-compressibility, sd15-aesthetic, sd3-pickscore-nft, ... (-1gpu)",
    )
    config: Path | None = Field(None, description="a JSON or TOML file of settings; the command line wins over it")
    algorithm: Literal[tuple(ALGORITHMS)] = Field(
        "ddpo",
        description="ddpo: PPO on sampled trajectories and rewards; dpo: Diffusion-DPO on preference pairs "
        "(dpo.*); refl: ReFL / DRaFT / AlignProp on a differentiable reward (refl.*); nft: DiffusionNFT and awm: "
        "Advantage Weighted Matching, the denoising loss on rewarded samples (nft.*, awm.*); dgpo: DGPO, that "
        "loss weighted by each group's preference (dgpo.*)",
    )
    run: RunConfig = RunConfig()
    pretrained: PretrainedConfig = PretrainedConfig()
    sample: SampleConfig = SampleConfig()
    train: TrainConfig = TrainConfig()
    ddpo: DDPOConfig = DDPOConfig()
    prompt: PromptConfig = PromptConfig()
    reward: RewardConfig = RewardConfig()
    dpo: DPOConfig = DPOConfig()
    refl: ReFLConfig = ReFLConfig()
    nft: NFTConfig = NFTConfig()
    awm: AWMConfig = AWMConfig()
    dgpo: DGPOConfig = DGPOConfig()

    @model_validator(mode="before")
    @classmethod
    def _layers(cls, given: Any) -> Any:
        """Preset, then config file, then what was given explicitly (command line or keyword arguments)."""
        from trainer.config.presets import PRESETS, merge

        if not isinstance(given, dict):
            return given
        name = given.get("preset", cls.model_fields["preset"].default)
        if name not in PRESETS:
            raise ValueError(f"preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        # Each preset its own default folder, so that two recipes never mix their runs in one (set here, not
        # in each preset: a preset derived from another would inherit its folder).
        layered = merge({"run": {"output_dir": f"outputs/{name}"}}, moved_settings(PRESETS[name], f"preset {name}"))
        if given.get("config") is not None:
            layered = merge(layered, moved_settings(read_settings_file(Path(given["config"])), given["config"]))
        return merge(layered, moved_settings(given, "given"))

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        """Settings that each make sense alone but contradict each other."""
        if self.train.per_prompt_stat_tracking and self.train.group_by == "prompt":
            raise ValueError(
                "train.group_by prompt pools each prompt's images within the epoch, train.per_prompt_stat_tracking "
                "across epochs: choose one"
            )
        if self.train.per_prompt_stat_tracking and self.sample.images_per_prompt > 1:
            # compute_advantages normalises per prompt string and never sees the groups.
            raise ValueError(
                f"train.per_prompt_stat_tracking normalises per prompt across epochs, sample.images_per_prompt "
                f"({self.sample.images_per_prompt}) > 1 within each group of one epoch: choose one (set "
                "--no-train.per_prompt_stat_tracking, or sample.images_per_prompt 1)"
            )
        stochastic = ALGORITHMS[self.algorithm].stochastic_steps(self)
        if self.train.timestep_selection == "stratified" and (
            int(stochastic * self.train.timestep_span) - 1 < max(1, int(stochastic * self.train.timestep_fraction))
        ):
            raise ValueError(
                f"train.timestep_selection stratified: the {max(1, int(stochastic * self.train.timestep_fraction))} "
                f"strata need as many steps between 1 and int(train.timestep_span x {stochastic}) = "
                f"{int(stochastic * self.train.timestep_span)}: raise train.timestep_span or lower "
                "train.timestep_fraction"
            )
        if self.train.norm_guard_coef and not ALGORITHMS[self.algorithm].norm_guard:
            guarded = ", ".join(name for name, a in ALGORITHMS.items() if a.norm_guard)
            raise ValueError(
                f"train.norm_guard_coef: NormGuard's hinge is added to a loss local in the velocity, which only "
                f"--algorithm {guarded} train with; set it to 0 for this one"
            )
        if self.run.offload_text_encoders and self.run.shard_text_encoders:
            raise ValueError(
                "run.offload_text_encoders and run.shard_text_encoders: two ways to take the text encoders off "
                "each GPU; choose one"
            )
        if self.run.sharding != "none":
            _shardable(self)
        elif self.run.shard_text_encoders:
            raise ValueError("run.shard_text_encoders: shards beside the denoiser; set run.sharding fsdp or hybrid")
        ALGORITHMS[self.algorithm].check(self)  # each algorithm's own (trainer/algorithms/<name>/checks.py)
        return self


def _shardable(cfg: Config) -> None:
    """What run.sharding cannot run with (yet): each a clear error before any model loads."""
    refused = {
        "run.mixed_precision fp16": cfg.run.mixed_precision == "fp16",  # needs a sharded grad scaler: use bf16
        "train.use_8bit_adam": cfg.train.use_8bit_adam,  # bitsandbytes' AdamW does not take DTensors
        "train.use_adafactor": cfg.train.use_adafactor,  # not tested with DTensors
    }
    for setting, given in refused.items():
        if given:
            raise ValueError(f"run.sharding {cfg.run.sharding}: not with {setting} (use bf16 and AdamW)")
