"""The published recipes on real checkpoints, as presets (``--preset NAME``). The ``sd15-*`` presets are
ddpo-pytorch's published 8-GPU runs (github.com/kvablack/ddpo-pytorch, config/dgx.py), ``sdxl-*`` the same
recipe at 1024 px, ``sd3-*`` Flow-GRPO's, DiffusionNFT's and AWM's, ``flux-*`` Flow-GRPO's on FLUX.1-dev,
``*-dpo-pickapic`` Diffusion-DPO's and ``*-refl-*`` ImageReward's ReFL. Each ``-1gpu`` variant keeps the samples
per epoch and the effective train batch on one GPU: sampling batches x GPUs, train batch 1, gradient
accumulation x (train batch x GPUs), and as many samples per denoiser forward (timesteps_per_forward x train
batch). Per-GPU batches are sized for an 80 GB GPU by ``python -m bench.gpu_estimate``.
"""

from __future__ import annotations

from typing import Any

from trainer.config.group import one_gpu
from trainer.config.group import overridden as _with
from trainer.prompts import ASSETS

# ddpo-pytorch's base config for SD1.5, as overrides of our tiny defaults.
_SD15 = {
    "run": {"num_epochs": 100, "save_freq": 20, "checkpoint_limit": 5, "mixed_precision": "fp16"},
    "pretrained": {"model": "runwayml/stable-diffusion-v1-5"},
    "sample": {"num_steps": 50, "eta": 1.0, "guidance_scale": 5.0, "batch_size": 8, "num_batches_per_epoch": 4},
    "train": {
        "batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 3e-4,
        "adv_clip_max": 5.0,
        "timestep_fraction": 1.0,
        "max_grad_norm": 1.0,
        "num_inner_epochs": 1,
        "lora_rank": 4,
        "lora_alpha": 4.0,
        "lora_targets": ["to_q", "to_k", "to_v", "to_out.0"],
        "per_prompt_stat_tracking": True,
        "stat_buffer_size": 16,
        "stat_min_count": 16,
        "timesteps_per_forward": 5,  # 20 samples per UNet forward: about 55 GB of 80 (bench/gpu_estimate.py)
    },
    "ddpo": {"clip_range": 1e-4, "cfg": True},
    "prompt": {"fn": "imagenet_animals"},
}


# SDXL at 1024 px with the same recipe: the same samples per epoch (256 on 8 GPUs) and effective train batch
# (64), in per-GPU batches sized for an 80 GB GPU (bench/gpu_estimate.py).
_SDXL = _with(
    _SD15,
    pretrained={"model": "stabilityai/stable-diffusion-xl-base-1.0"},
    sample={"batch_size": 4, "num_batches_per_epoch": 8, "resolution": 1024},
    train={"batch_size": 2, "gradient_accumulation_steps": 4, "timesteps_per_forward": 1},  # about 44 GB of 80
)

# Flow-GRPO on SD3.5-Medium (Liu et al. 2025; github.com/yifan123/flow_grpo, config/grpo.py): 48 groups of 24
# images per epoch, 10 SDE steps (noise level 0.7), guidance 4.5, two optimizer steps per epoch, KL to the
# adapter-disabled model, LoRA r32 on the joint attention. Its 32 GPUs become 8 here: 144 samples per GPU.
_SD3_LORA = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]
# Flow-GRPO's FLUX LoRA (scripts/train_flux.py): SD3's attention targets (which also match the single-stream
# blocks' attn.to_q/k/v) and the double-stream blocks' feed-forwards.
_FLUX_LORA = [*_SD3_LORA, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
_FLOW_GRPO = {
    "run": {"num_epochs": 1000, "save_freq": 60, "mixed_precision": "bf16"},
    "pretrained": {"model": "stabilityai/stable-diffusion-3.5-medium"},
    "sample": {
        "num_steps": 10,
        "eval_num_steps": 40,
        "eta": 0.7,
        "guidance_scale": 4.5,
        "resolution": 512,
        "batch_size": 9,
        "num_batches_per_epoch": 16,
        "images_per_prompt": 24,
    },
    "train": {
        "batch_size": 9,
        "gradient_accumulation_steps": 8,
        "learning_rate": 3e-4,
        "adv_clip_max": 5.0,
        "timestep_fraction": 0.99,
        "timestep_selection": "first",
        "max_grad_norm": 1.0,
        "group_std": "global",
        "group_by": "prompt",
        "lora_rank": 32,
        "lora_alpha": 64.0,
        "lora_targets": _SD3_LORA,
        "ema_decay": 0.987,  # Flow-GRPO's EMA decays by 0.9 every 8 steps; 0.9 ** (1 / 8) per step
        "timesteps_per_forward": 1,  # 9 samples per forward, T5 on the GPU: about 72 GB of 80
    },
    "ddpo": {"clip_range": 1e-4, "cfg": True},
}

RECIPES: dict[str, dict[str, Any]] = {
    "sd15-compressibility": _with(_SD15, reward={"scorer": "compression"}),
    "sd15-incompressibility": _with(_SD15, reward={"scorer": "incompressibility"}),
    "sd15-aesthetic": _with(
        _SD15,
        run={"num_epochs": 200},
        prompt={"fn": "simple_animals"},
        reward={"scorer": "aesthetic"},
        train={"stat_buffer_size": 32},
    ),
    # 6 training GPUs (2 more serve LLaVA): 6 x 12 x 4 = 288 samples, effective batch 4 x 6 x 6 = 144.
    "sd15-alignment": _with(
        _SD15,
        run={"num_epochs": 200},
        prompt={"fn": "nouns_activities"},
        reward={"scorer": "llava"},
        sample={"batch_size": 12, "num_batches_per_epoch": 4},
        train={"gradient_accumulation_steps": 6, "stat_buffer_size": 32},
    ),
    "sdxl-compressibility": _with(_SDXL, reward={"scorer": "compression"}),
    "sdxl-aesthetic": _with(
        _SDXL,
        run={"num_epochs": 200},
        prompt={"fn": "simple_animals"},
        reward={"scorer": "aesthetic"},
        train={"stat_buffer_size": 32},
    ),
    # Flow-GRPO's GenEval and OCR runs (config/grpo.py geneval_sd3, general_ocr_sd3): its recipe with KL 0.04
    # (its beta, its KL convention included: trainer/families/flow.py, flow_grpo_kl); GenEval trained on the fraction
    # of requirements met and evaluated on its 553 prompts (--reward.options strict=true scores as GenEval);
    # OCR on text-rendering prompts, evaluated on Flow-GRPO's 1,018 OCR prompts.
    "sd3-geneval": _with(
        _FLOW_GRPO,
        train={"kl_coef": 0.04},
        reward={"scorer": "geneval"},
        prompt={"fn": "geneval", "eval_path": str(ASSETS / "geneval" / "evaluation_prompts.txt")},
    ),
    "sd3-ocr": _with(
        _FLOW_GRPO,
        train={"kl_coef": 0.04},
        reward={"scorer": "ocr"},
        prompt={"fn": "ocr", "eval_path": str(ASSETS / "ocr" / "flow_grpo_test.txt")},
    ),
    "sd3-pickscore": _with(
        _FLOW_GRPO, train={"kl_coef": 0.01}, prompt={"fn": "nouns_activities"}, reward={"scorer": "pickscore"}
    ),
    # Flow-GRPO-Fast without CFG: 3 CPS steps starting in the first half, the rest ODE; no KL. Clip range 1e-5
    # on CPS's constant-free log-prob, as there (trainer/families/flow.py).
    "sd3-pickscore-fast": _with(
        _FLOW_GRPO,
        prompt={"fn": "nouns_activities"},
        reward={"scorer": "pickscore"},
        sample={"guidance_scale": 1.0, "eta": 0.8, "sde_type": "cps"},
        train={"kl_coef": 0.0, "timestep_fraction": 1.0},
        ddpo={"cfg": False, "clip_range": 1e-5, "timestep_window": 3, "timestep_window_latest_start": 2},
    ),
}

# Flow-GRPO on FLUX.1-dev (config/grpo.py pickscore_flux and geneval_flux_fast, scripts/train_flux.py): 48 groups
# of 24 per epoch at 512 px, 6 steps, guidance 3.5 as the transformer's input (trainer/families/flux.py: no
# second pass), two optimizer steps per epoch, no KL, LoRA r64/a128 on the attention and feed-forwards, T5 at 128
# tokens. Its 32 GPUs become 8 here: 144 samples per GPU. Sized by bench/gpu_estimate.py with T5 on the GPU: 3
# samples per training forward need about 61 GB of 80 (4 is the most), a sampling batch of 12 about 40.
_FLUX_GRPO = _with(
    _FLOW_GRPO,
    run={"save_freq": 30},
    pretrained={"model": "black-forest-labs/FLUX.1-dev", "max_sequence_length": 128},
    sample={
        "num_steps": 6,
        "eval_num_steps": 28,
        "eta": 0.9,
        "guidance_scale": 3.5,
        "batch_size": 12,
        "num_batches_per_epoch": 12,
    },
    train={
        "kl_coef": 0.0,
        "batch_size": 3,
        "gradient_accumulation_steps": 24,
        "lora_rank": 64,
        "lora_alpha": 128.0,
        "lora_targets": _FLUX_LORA,
    },
)
RECIPES["flux-pickscore-grpo"] = _with(_FLUX_GRPO, prompt={"fn": "nouns_activities"}, reward={"scorer": "pickscore"})
# Pref-GRPO's FLUX.1-dev LoRA scripts (CodeGoat24/Pref-GRPO scripts/lora/, on DanceGRPO's trainer): 25 steps
# at SDE noise 0.7, the first 60% trained, clip range 1e-4, lr 1e-5, LoRA r64/a128, no KL, one initial noise per
# group. UnifiedReward alone judges 16 images per prompt pointwise ("Final Score:" / 5); Pref-GRPO compares 8
# per prompt pairwise with UnifiedReward-Think (win rates) beside a CLIP score, each reward z-scored within its
# group before the sum (GDPO; equal weights: we read none in its scripts). Its prompts (UniGenBench's training
# set) are not packaged here: nouns_activities stands in. The judges are served as docs/rewards.md shows (vLLM,
# --served-model-name UnifiedReward, port 8080).
_PREF_GRPO = _with(
    _FLUX_GRPO,
    prompt={"fn": "nouns_activities"},
    sample={"num_steps": 25, "eta": 0.7, "same_noise_per_group": True},
    train={"learning_rate": 1e-5, "timestep_fraction": 0.6},
)
_JUDGE = {"base_url": "http://127.0.0.1:8080/v1", "model": "UnifiedReward"}
RECIPES["flux-unifiedreward-grpo"] = _with(
    _PREF_GRPO,
    sample={"images_per_prompt": 16},
    reward={"scorer": "vlm", "options": {**_JUDGE, "mode": "pointwise"}},
)
RECIPES["flux-unifiedreward-clip-grpo"] = _with(
    _PREF_GRPO,
    sample={"images_per_prompt": 8},
    reward={
        "aggregation": "gdpo",
        "components": [
            {
                "scorer": "vlm",
                "name": "unifiedreward_think",
                "options": {**_JUDGE, "mode": "pairwise", "image_format": "jpeg"},
            },
            {"scorer": "clipscore"},
        ],
    },
)
# GenEval: Flow-GRPO's FLUX recipe is its Fast one (3 CPS steps at noise 0.8 in the first half, the rest ODE,
# clip range 1e-5), on sd3-geneval's prompts and scorer.
RECIPES["flux-geneval-grpo"] = _with(
    _FLUX_GRPO,
    prompt=RECIPES["sd3-geneval"]["prompt"],
    reward=RECIPES["sd3-geneval"]["reward"],
    sample={"eta": 0.8, "sde_type": "cps"},
    train={"timestep_fraction": 1.0},
    ddpo={"clip_range": 1e-5, "timestep_window": 3, "timestep_window_latest_start": 0},
)

# Diffusion-DPO's published runs (Wallace et al. 2023; github.com/SalesforceAIResearch/DiffusionDPO,
# launchers/): the full UNet on Pick-a-Pic v2, effective batch 2048 on 16 GPUs (1 x 128 accumulation), lr 1e-8
# scaled by the batch (2.048e-5), constant after 500 warm-up steps, 2000 steps, beta 5000; SDXL with Adafactor
# and gradient checkpointing. Pick-a-Pic has left the hub: point --dpo.dataset at a local copy.
_DPO = {
    "algorithm": "dpo",
    "run": {"mixed_precision": "fp16", "checkpoint_limit": 5},
    "pretrained": {"model": "runwayml/stable-diffusion-v1-5"},
    "train": {
        "batch_size": 1,
        "gradient_accumulation_steps": 128,
        "learning_rate": 1e-8,
        "lora": False,
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 500,
        "adam_weight_decay": 1e-2,
    },
    "dpo": {
        "dataset": "yuvalkirstain/pickapic_v2",
        "beta": 5000.0,
        "scale_lr": True,
        "max_train_steps": 2000,
        "checkpointing_steps": 500,
        "dataloader_num_workers": 16,
    },
}
RECIPES["sd15-dpo-pickapic"] = _with(_DPO)
RECIPES["sdxl-dpo-pickapic"] = _with(
    _DPO,
    pretrained={"model": "stabilityai/stable-diffusion-xl-base-1.0"},
    train={"use_adafactor": True, "gradient_checkpointing": True},
)
# One GPU, the same effective batch of 2048 pairs: 16 x the accumulation (a 16th of the speed; unmeasured).
for _name in ("sd15-dpo-pickapic", "sdxl-dpo-pickapic"):
    RECIPES[f"{_name}-1gpu"] = _with(RECIPES[_name], train={"gradient_accumulation_steps": 128 * 16})

# ReFL as ImageReward's (Xu et al. 2023, github.com/THUDM/ImageReward): 40 DDIM steps, the grad
# step drawn from [30, 39], no CFG, lr 1e-5, effective batch 64 (8 GPUs x 2 x 4), 100 steps, grad clip 1,
# gradient checkpointing, fp16, LoRA on attention as the DDPO presets. The reward in process or served.
_REFL = _with(
    {**_SD15, "algorithm": "refl"},
    run={"num_epochs": 1},
    train={
        "batch_size": 2,
        "gradient_accumulation_steps": 4,
        "learning_rate": 1e-5,
        "gradient_checkpointing": True,
        "per_prompt_stat_tracking": False,
        "ema_decay": 0.0,
    },
    refl={
        "num_steps": 40,
        "mid_low": 30,
        "mid_high": 39,
        "margin": 2.0,
        "grad_scale": 1e-3,
        "max_train_steps": 100,
        "checkpointing_steps": 50,
    },
)
RECIPES["sd15-refl-aesthetic"] = _with(
    _REFL,
    prompt={"fn": "simple_animals"},
    reward={"scorer": "aesthetic"},
)
RECIPES["sd15-refl-pickscore"] = _with(
    _REFL,
    prompt={"fn": "nouns_activities"},
    reward={"scorer": "pickscore"},
)
RECIPES["sdxl-refl-aesthetic"] = _with(
    _REFL,
    pretrained={"model": "stabilityai/stable-diffusion-xl-base-1.0"},
    train={"batch_size": 1, "gradient_accumulation_steps": 8},
    prompt={"fn": "simple_animals"},
    reward={"scorer": "aesthetic"},
)
# DiffusionNFT's SD3.5-M run (github.com/NVlabs/DiffusionNFT, config/nft.py): 48 groups of 24 per epoch from the
# deterministic sampler at guidance 1, 10 steps, 0.99 of them trained per image, one optimizer step per epoch
# (1152 samples: 9 x 8 GPUs x 16), LoRA r32/64, lr 3e-4, KL 1e-4 to the base, EMA 0.9 for the saved weights.
# AWM's (github.com/scxue/advantage_weighted_matching): the same epoch, 14 steps with 6 trained, KL 1e-4 to the
# base (PickScore) and 1.0 to its lagging average. Per-GPU batches as Flow-GRPO's presets (not re-estimated).
_FORWARD = _with(
    _FLOW_GRPO,
    sample={"eta": 0.0, "guidance_scale": 1.0},
    train={"timestep_selection": "random", "gradient_accumulation_steps": 16, "ema_decay": 0.9},
    ddpo={"cfg": False},
)
RECIPES["sd3-pickscore-nft"] = _with(
    _FORWARD,
    algorithm="nft",
    train={"kl_coef": 1e-4},
    prompt={"fn": "nouns_activities"},
    reward={"scorer": "pickscore"},
)
# AWM: 6 timesteps per training batch, one per stratum of steps 1-11 of the 14 (its discrete_wo_init at
# timestep_fraction 0.9: [1], [2, 3], ..., [10, 11]; never the pure-noise step 0), shared by the batch.
RECIPES["sd3-pickscore-awm"] = _with(
    _FORWARD,
    algorithm="awm",
    sample={"num_steps": 14},
    train={
        "kl_coef": 1e-4,
        "timestep_fraction": 6 / 14,
        "timestep_selection": "stratified",
        "timestep_span": 0.9,
        "timestep_shared": True,
    },
    prompt={"fn": "nouns_activities"},
    reward={"scorer": "pickscore"},
)
# Their GenEval and OCR runs: the same epochs on those prompts and rewards. AWM's KL to the base is 1e-3 for
# GenEval and 3e-3 for OCR; DiffusionNFT's OCR config mixes at b 0.1 and lets the old policy lag far more
# (d 0 for 75 steps, then min(0.0075 (step - 75), 0.999)). DiffusionNFT's KL 1e-4 and AWM's 14 steps are their
# PickScore run's.
_TASKS = {
    "geneval": {"nft": {}, "awm": {"train": {"kl_coef": 1e-3}}},
    "ocr": {
        "nft": {"nft": {"beta": 0.1, "old_decay_flat_steps": 75, "old_decay_rate": 0.0075, "old_decay_max": 0.999}},
        "awm": {"train": {"kl_coef": 3e-3}},
    },
}
for _task, _methods in _TASKS.items():
    _on = {"prompt": RECIPES[f"sd3-{_task}"]["prompt"], "reward": RECIPES[f"sd3-{_task}"]["reward"]}
    for _method, _settings in _methods.items():
        RECIPES[f"sd3-{_task}-{_method}"] = _with(RECIPES[f"sd3-pickscore-{_method}"], **_on, **_settings)
# SD1.5 and SDXL (not in the papers): DiffusionNFT on ddpo-pytorch's runs, deterministic DDIM rollouts at their
# guidance 5 (CFG-free SD1.5 images are poor), 20% of the 50 steps trained per image; unmeasured.
_NFT_DDIM = {"sample": {"eta": 0.0}, "train": {"timestep_fraction": 0.2, "kl_coef": 1e-4, "ema_decay": 0.9}}
RECIPES["sd15-aesthetic-nft"] = _with(RECIPES["sd15-aesthetic"], algorithm="nft", **_NFT_DDIM)
RECIPES["sdxl-pickscore-nft"] = _with(
    RECIPES["sdxl-aesthetic"],
    algorithm="nft",
    **_NFT_DDIM,
    prompt={"fn": "nouns_activities"},
    reward={"scorer": "pickscore"},
)
_GPUS = {
    "sd15-compressibility": 8,
    "sd15-incompressibility": 8,
    "sd15-aesthetic": 8,
    "sd15-alignment": 6,
    "sdxl-compressibility": 8,
    "sdxl-aesthetic": 8,
    "sd3-geneval": 8,
    "sd3-ocr": 8,
    "sd3-pickscore": 8,
    "sd3-pickscore-fast": 8,
    "sd3-pickscore-nft": 8,
    "sd3-pickscore-awm": 8,
    "sd3-geneval-nft": 8,
    "sd3-geneval-awm": 8,
    "sd3-ocr-nft": 8,
    "sd3-ocr-awm": 8,
    "sd15-aesthetic-nft": 8,
    "sdxl-pickscore-nft": 8,
    "flux-pickscore-grpo": 8,
    "flux-geneval-grpo": 8,
}


RECIPES.update({f"{name}-1gpu": one_gpu(RECIPES[name], gpus) for name, gpus in _GPUS.items()})
