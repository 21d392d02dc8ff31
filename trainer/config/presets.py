"""Named starting points: ``--preset NAME``; anything given on the command line or in ``--config`` wins.

``tiny`` is the built-in default (CPU, minutes); ``tiny-sdxl``, ``tiny-sd3`` and ``tiny-flux`` the same on those
families' shapes; ``shapes*`` the shapes world (scorers/world.py) on CPU, on tiny-shapes (SD1) and tiny-shapes-sd3.
The recipes of the papers on real checkpoints are in trainer/config/recipes.py (DGPO's here, beside its shapes
preset); FLUX.2 [klein]'s, Qwen-Image's and Z-Image's, tiny and published, in trainer/config/family_presets.py.
"""

from __future__ import annotations

from typing import Any

from trainer.config.group import overridden as _with
from trainer.config.family_presets import FAMILY_PRESETS
from trainer.config.recipes import _FLUX_LORA, _SD3_LORA, RECIPES
from trainer.prompts import ASSETS

# The shapes world (scorers/world.py): tiny-shapes, pretrained on it, finetuned toward GenEval-style
# captions as the verifier checks them; evaluated before and after on the held-out captions (60 images per
# category, deterministic sampling). `python -m trainer` runs "shapes-sd3-nft" (DiffusionNFT on the flow-matching
# world, below); what each recipe here measured is in docs/learning.md.
_SHAPES = {
    "run": {"num_epochs": 30, "eval_every": 30, "log_images_every": 10},
    "pretrained": {"model": "tiny-shapes"},
    # Groups of 4 images per prompt: advantages relative to the prompt's own group. With the epoch's global
    # statistics instead, hard captions' samples are all pushed down and the model degrades; lr 1e-3 between
    # the rates that degrade it and those that do not move it (docs/learning.md).
    "sample": {
        "num_steps": 20,
        "eta": 1.0,
        "guidance_scale": 5.0,
        "batch_size": 16,
        "num_batches_per_epoch": 2,
        "images_per_prompt": 4,
    },
    "train": {
        "batch_size": 8,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-3,
        "lora_rank": 8,
        "lora_alpha": 8.0,
    },
    "prompt": {"fn": "shapes", "eval_path": str(ASSETS / "shapes_eval.txt")},
    "reward": {"scorer": "shapes"},
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    # Flow-GRPO's recipe on SD1: group advantages over the epoch's std, KL 0.04 to the base model. The KL is
    # what keeps the adapters' random walk (bench/gradient_snr.py: each step's gradient is mostly noise) from
    # drifting the colours (docs/learning.md, shapes against shapes-nokl over 4 training seeds).
    "shapes": _with(_SHAPES, train={"kl_coef": 0.04, "group_std": "global"}),
    "shapes-nokl": _with(_SHAPES),
    # ddpo-pytorch's plain recipe on the same budget: one image per prompt, per-prompt statistics.
    "shapes-ddpo": _with(
        _SHAPES,
        sample={"images_per_prompt": 1},
        train={"per_prompt_stat_tracking": True, "stat_buffer_size": 16, "stat_min_count": 16},
    ),
    # DiffusionNFT on the same world: 8 prompts x 4 images from the deterministic sampler (DDIM eta 0, guidance
    # 5), each image trained at 4 of the 20 steps with fresh noise, 2 passes per epoch, the old policy the
    # weights at the start of each epoch (no lag), no KL; advantages over the epoch's std as DiffusionNFT.
    "shapes-nft": _with(
        _SHAPES,
        algorithm="nft",
        run={"num_epochs": 50, "eval_every": 50},
        sample={"eta": 0.0},
        nft={"beta": 1.0, "old_decay_rate": 0.0},
        train={
            "learning_rate": 3e-4,
            "timestep_fraction": 0.2,
            "num_inner_epochs": 2,
            "gradient_accumulation_steps": 1,
            "group_std": "global",
            "kl_coef": 0.0,
        },
    ),
    # AWM on the same rollouts and steps: the advantage-weighted denoising loss, KL 1e-3 to the base and 1.0 to
    # the lagging average (AWM's GenEval settings).
    "shapes-awm": _with(
        _SHAPES,
        algorithm="awm",
        run={"num_epochs": 50, "eval_every": 50},
        sample={"eta": 0.0},
        train={
            "learning_rate": 3e-4,
            "timestep_fraction": 0.2,
            "num_inner_epochs": 2,
            "gradient_accumulation_steps": 1,
            "group_std": "global",
            "kl_coef": 1e-3,
        },
    ),
    "tiny-sdxl": {
        "pretrained": {"model": "tiny-sdxl"},
    },  # SDXL's shape, CPU
    # Flow-GRPO's shape on CPU: groups of 4, 10 SDE steps, KL to the reference.
    "tiny-sd3": {
        "pretrained": {"model": "tiny-sd3"},
        "sample": {"num_steps": 10, "eval_num_steps": 40, "eta": 0.7, "guidance_scale": 4.5, "images_per_prompt": 4},
        "train": {"timestep_fraction": 0.99, "timestep_selection": "first", "kl_coef": 0.04, "lora_targets": _SD3_LORA},
    },
    # FLUX.1-dev's shape on CPU (trainer/families/flux.py): Flow-GRPO's FLUX run in miniature, 6 SDE steps at noise 0.9,
    # the distilled guidance 3.5 as a transformer input (no second pass), groups of 4, its LoRA targets.
    "tiny-flux": {
        "pretrained": {"model": "tiny-flux"},
        "sample": {"num_steps": 6, "eval_num_steps": 28, "eta": 0.9, "guidance_scale": 3.5, "images_per_prompt": 4},
        "train": {
            "timestep_fraction": 0.99,
            "timestep_selection": "first",
            "kl_coef": 0.04,
            "lora_targets": _FLUX_LORA,
        },
    },
}
# The shapes world: ReFL on tiny-shapes with its tiny CLIP's score as the reward, evaluated by the verifier.
PRESETS["shapes-refl"] = _with(
    {**_SHAPES, "algorithm": "refl"},
    run={"eval_every": 100, "eval_scorer": "shapes"},
    train={"batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 1e-4},
    reward={"scorer": "clipscore", "options": {"checkpoint": "tiny-shapes"}},
    refl={"num_steps": 20, "mid_low": 14, "mid_high": 19, "margin": 100.0, "grad_scale": 1e-3, "max_train_steps": 100},
)

# The shapes world on its flow-matching model, tiny-shapes-sd3 (trainer/tools/shapes_model.py --family sd3): the
# shapes presets' prompts, groups of 4, LoRA r8 and held-out evaluation, with 10 sampler steps and guidance 4.5
# as Flow-GRPO samples SD3.5 (it evaluates at 40 steps; these at 10, the same sampler they train with).
_SHAPES_SD3 = _with(
    _SHAPES,
    pretrained={"model": "tiny-shapes-sd3"},
    sample={"num_steps": 10, "guidance_scale": 4.5},
    train={"lora_targets": _SD3_LORA},
)
# Flow-GRPO's recipe: SDE noise level 0.7, the first 0.99 of the steps trained, advantages over the epoch's std,
# PPO clip 1e-4, KL 0.04 in its convention (trainer/families/flow.py). LoRA r8 and lr 1e-3 as the shapes presets (its
# r32, lr 3e-4 and weight EMA are SD3.5's).
PRESETS["shapes-sd3-grpo"] = _with(
    _SHAPES_SD3,
    sample={"eta": 0.7},
    train={
        "timestep_fraction": 0.99,
        "timestep_selection": "first",
        "group_std": "global",
        "kl_coef": 0.04,
    },
    ddpo={"clip_range": 1e-4},
)
# Flow-GRPO-Fast as sd3-pickscore-fast: CPS steps at noise level 0.8 in a window of 2 steps starting at one of the
# first 3, ODE elsewhere, clip 1e-5 on CPS's constant-free log-prob, no KL; with guidance, unlike there (the tiny
# model's unguided images are poorer).
PRESETS["shapes-sd3-grpo-fast"] = _with(
    PRESETS["shapes-sd3-grpo"],
    sample={"eta": 0.8, "sde_type": "cps"},
    train={"kl_coef": 0.0, "timestep_fraction": 1.0},
    ddpo={"clip_range": 1e-5, "timestep_window": 2, "timestep_window_latest_start": 2},
)
# DiffusionNFT and AWM as shapes-nft and shapes-awm: ODE rollouts, each image trained at 4 of its 10 steps;
# rollouts and evaluation without guidance, as both papers sample (guidance 1): both train the conditional
# velocity alone, and guided rollouts learn far slower (DiffusionNFT's users report the same, NVlabs/DiffusionNFT
# issue 37; docs/shapes-sd3.md). 130 epochs: about 15 minutes on one core, 11 on two; the command line's default.
PRESETS["shapes-sd3-nft"] = _with(
    _SHAPES_SD3,
    algorithm="nft",
    run={"num_epochs": 130, "eval_every": 130},
    sample={"eta": 0.0, "guidance_scale": 1.0},
    nft={"beta": 1.0, "old_decay_rate": 0.0},
    train={
        "learning_rate": 3e-4,
        "timestep_fraction": 0.4,
        "num_inner_epochs": 2,
        "gradient_accumulation_steps": 1,
        "group_std": "global",
        "kl_coef": 0.0,
    },
)
PRESETS["shapes-sd3-awm"] = _with(PRESETS["shapes-sd3-nft"], algorithm="awm", train={"kl_coef": 1e-3})
# DGPO (arXiv 2510.08425; github.com/Luo-Yihong/DGPO config/dgpo.py) on the same world: ODE rollouts with
# guidance 4.5 as DGPO samples, 8 groups of 4, each sample trained at 4 steps of the first 6 of 10 shared by
# its group, one noise per group and step, advantages within each group; its GenEval values (beta_dpo 100, KL
# 0.02, clip 1e-2); rollouts from the EMA old weights after 200 optimizer steps (4 an epoch). Unmeasured.
PRESETS["shapes-sd3-dgpo"] = _with(
    _SHAPES_SD3,
    algorithm="dgpo",
    run={"num_epochs": 130, "eval_every": 130},
    sample={"eta": 0.0},
    train={"learning_rate": 3e-4, "gradient_accumulation_steps": 1, "kl_coef": 0.02},
    dgpo={"beta_dpo": 100.0, "num_timesteps": 4, "trunc": 0.6, "clip": 1e-2, "switch_ema_ref": 200},
)
# Online Diffusion-DPO (as bench/dpo.py's online mode): rounds of 64 pairs, each prompt's best and worst of 2
# ODE samples, batches of 8, 10% empty captions; beta 5000 is Diffusion-DPO's SD1.5 value, unmeasured on flow.
PRESETS["shapes-sd3-dpo"] = _with(
    _SHAPES_SD3,
    algorithm="dpo",
    run={"eval_every": 100},
    sample={"eta": 0.0, "batch_size": 32},
    train={"batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 1e-4},
    dpo={
        "online": True,
        "proportion_empty_prompts": 0.1,
        "hflip": False,
        "max_train_steps": 100,
        "checkpointing_steps": 0,
    },
)
# ReFL as shapes-refl: the tiny CLIP's score, its gradient through one step drawn from the last 3 of 10.
PRESETS["shapes-sd3-refl"] = _with(
    PRESETS["shapes-refl"],
    pretrained={"model": "tiny-shapes-sd3"},
    sample={"num_steps": 10, "guidance_scale": 4.5},
    train={"lora_targets": _SD3_LORA},
    refl={"num_steps": 10, "mid_low": 7, "mid_high": 9},
)

# DGPO's SD3.5-M recipes (Luo-Yihong/DGPO config/dgpo.py geneval_sd3_4gpu), here beside its shapes preset, for 4 GPUs:
# per GPU 2 batches of 16 from the ODE sampler at guidance 4.5 (groups of 16, 8 groups an epoch), one optimizer
# step per epoch over batches of whole groups, each sample at 4 steps of the first 4 of 10 (GenEval's trunc_steps),
# beta_dpo 100, KL 0.02 to the base, clip 1e-2 against the EMA old model, rollouts from it after 500 steps;
# advantages within each group (its per-prompt statistics of one epoch). PickScore (the paper's): groups of 24,
# beta_dpo 10, KL 1e-3, the first 6 of 10 steps, the switch after 200; gradient checkpointing for 24 samples a
# forward. Both evaluate at 40 steps as sd3-geneval (DGPO at 14); unmeasured here.
_DGPO = {
    "algorithm": "dgpo",
    "sample": {
        "eta": 0.0,
        "guidance_scale": 4.5,
        "batch_size": 16,
        "num_batches_per_epoch": 2,
        "images_per_prompt": 16,
    },
    "train": {"batch_size": 16, "gradient_accumulation_steps": 2, "group_std": "group", "group_by": "group"},
    "dgpo": {"beta_dpo": 100.0, "num_timesteps": 4, "trunc": 0.4, "clip": 1e-2, "switch_ema_ref": 500},
}
PRESETS["sd3-geneval-dgpo"] = _with(_with(RECIPES["sd3-geneval"], **_DGPO), train={"kl_coef": 0.02})
PRESETS["sd3-pickscore-dgpo"] = _with(
    _with(RECIPES["sd3-pickscore"], **_DGPO),
    sample={"batch_size": 24, "images_per_prompt": 24},
    train={"batch_size": 24, "kl_coef": 1e-3, "gradient_checkpointing": True},
    dgpo={"beta_dpo": 10.0, "trunc": 0.6, "switch_ema_ref": 200},
)

PRESETS.update(FAMILY_PRESETS)
PRESETS.update(RECIPES)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts merged, ``override`` winning."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
