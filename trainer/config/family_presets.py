"""The presets of the families added in 2026 (trainer/families/flux2.py, qwenimage.py, zimage.py): each one's tiny
CPU preset and the published recipes of the frameworks that train it (Flow-Factory, flow_grpo), merged into
trainer.config.presets.PRESETS."""

from __future__ import annotations

from typing import Any

from trainer.config.group import one_gpu
from trainer.config.group import overridden as _with
from trainer.config.recipes import _FLOW_GRPO, _SD3_LORA, RECIPES

# flow_grpo's Qwen-Image LoRA (config/grpo.py pickscore_qwenimage, scripts/train_qwenimage.py): the joint
# attention as SD3's, and both streams' feed-forwards (QwenImageTransformerBlock's img_mlp and txt_mlp).
_QWEN_LORA = [*_SD3_LORA, "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]

# Flow-Factory's Z-Image LoRA targets (its ZImageAdapter.default_target_modules): every ZImageTransformerBlock's
# attention and SwiGLU feed-forward (the refiners' and the main layers').
_ZIMAGE_LORA = [
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
]

FAMILY_PRESETS: dict[str, dict[str, Any]] = {
    # Qwen-Image's shape on CPU (trainer/families/qwenimage.py, trainer/families/tiny_qwenimage.py): flow_grpo's
    # pickscore_qwenimage in miniature, 6 SDE steps at its noise level 1.2, true CFG 4 (norm-rescaled, a second
    # pass on the empty prompt), groups of 4, its LoRA targets, at 64 px (the schedule is shifted for that size).
    "tiny-qwenimage": {
        "pretrained": {"model": "tiny-qwenimage"},
        "sample": {
            "num_steps": 6,
            "eval_num_steps": 10,
            "eta": 1.2,
            "guidance_scale": 4.0,
            "images_per_prompt": 4,
            "resolution": 64,
        },
        "train": {
            "timestep_fraction": 0.99,
            "timestep_selection": "first",
            "kl_coef": 0.04,
            "lora_targets": _QWEN_LORA,
        },
    },
    # Z-Image's shape on CPU (trainer/families/zimage.py): Flow-GRPO's SDE steps at noise 0.7, guidance 5 in our
    # convention (ZImagePipeline's 4), groups of 4, Flow-Factory's Z-Image LoRA targets.
    "tiny-zimage": {
        "pretrained": {"model": "tiny-zimage"},
        "sample": {"num_steps": 6, "eval_num_steps": 10, "eta": 0.7, "guidance_scale": 5.0, "images_per_prompt": 4},
        "train": {
            "timestep_fraction": 0.99,
            "timestep_selection": "first",
            "kl_coef": 0.04,
            "lora_targets": _ZIMAGE_LORA,
        },
    },
}
# Flow-Factory's FLUX.2 [klein] LoRA targets (github.com/X-GenGroup/Flow-Factory, models/flux/flux2_klein.py
# default_target_modules): the double-stream blocks' attention and feed-forwards, the single-stream blocks' fused
# qkv+mlp input. Its list also names attn.to_out.0 for the single-stream blocks, whose output projection is a
# plain attn.to_out (no .0): it matches none there, so theirs stays untrained, as here.
_FLUX2_LORA = [
    *_SD3_LORA,
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
    "attn.to_qkv_mlp_proj",
]
# FLUX.2-klein's shape on CPU (trainer/families/flux2.py): flux2-klein-pickscore-grpo in miniature, the distilled
# model's 4 steps with an SDE step at noise 0.5 on one of the first 3 (the rest ODE), no CFG, groups of 4.
FAMILY_PRESETS["tiny-flux2"] = {
    "pretrained": {"model": "tiny-flux2"},
    "sample": {"num_steps": 4, "eval_num_steps": 4, "eta": 0.5, "guidance_scale": 1.0, "images_per_prompt": 4},
    "train": {"timestep_fraction": 1.0, "lora_targets": _FLUX2_LORA},
    "ddpo": {"cfg": False, "timestep_window": 1, "timestep_window_latest_start": 2},
}
# Flow-Factory's GRPO examples (github.com/X-GenGroup/Flow-Factory, examples/grpo/lora/*) share one layout on 8
# GPUs: 48 groups of 16 an epoch (per GPU 6 sampling batches of one group), train batches of 4 over 12
# accumulation steps (two optimizer steps an epoch), the whole trajectory's steps trained, advantages within each
# group, no KL, LoRA r64/a128, PickScore; nouns_activities stand in for its PickScore prompts.
_FLOW_FACTORY_GRPO = _with(
    _FLOW_GRPO,
    sample={"batch_size": 16, "num_batches_per_epoch": 6, "images_per_prompt": 16},
    train={
        "batch_size": 4,
        "gradient_accumulation_steps": 12,
        "kl_coef": 0.0,
        "timestep_fraction": 1.0,
        "group_std": "group",
        "lora_rank": 64,
        "lora_alpha": 128.0,
    },
    prompt={"fn": "nouns_activities"},
    reward={"scorer": "pickscore"},
)
# Flow-Factory's FLUX.2 [klein] GRPO example (github.com/X-GenGroup/Flow-Factory, examples/grpo/lora/flux2_klein/
# default.yaml, on FLUX.2-klein-4B, the example's other checkpoint beside 9B): 48 groups of 16 per epoch at 384 px,
# the distilled 4 steps at guidance 1 (no CFG), Flow-SDE noise 0.5 on one step a trajectory drawn from steps 1
# and 2 (its sde_steps), clip 1e-4, no KL, lr 3e-4, weight decay 1e-4 (our default),
# two optimizer steps per epoch, advantages within each group, LoRA r64/a128 on their targets, PickScore (served
# by reward-server or in-process). Their 8 GPUs as ours; bench.gpu_families
# estimates 35 GB a GPU unsharded (docs/scale.md).
FAMILY_PRESETS["flux2-klein-pickscore-grpo"] = _with(
    _FLOW_FACTORY_GRPO,
    pretrained={"model": "black-forest-labs/FLUX.2-klein-4B"},
    sample={
        "num_steps": 4,
        "eval_num_steps": 10,
        "eta": 0.5,
        "guidance_scale": 1.0,
        "resolution": 384,
    },
    train={
        "adam_weight_decay": 1e-4,
        "lora_targets": _FLUX2_LORA,
    },
    ddpo={
        "cfg": False,
        "clip_range": 1e-4,
        "timestep_window": 1,
        "timestep_window_earliest_start": 1,
        "timestep_window_latest_start": 2,
    },
)
# Its DiffusionNFT example on the base model (examples/nft/lora/flux2_klein_base/default.yaml, FLUX.2-klein-base-
# 4B): ODE rollouts of 8 steps with real CFG at 4.0 from the old policy, b 0.1, its old-policy decay (flat 0, rate
# 0.001, max 0.5: ours by default), 2 steps per image stratified over the noisier half and shared by the batch
# (theirs may draw step 0, ours never), lr 1e-4, one optimizer step per epoch, no KL; evaluated at 28 steps.
FAMILY_PRESETS["flux2-klein-pickscore-nft"] = _with(
    FAMILY_PRESETS["flux2-klein-pickscore-grpo"],
    algorithm="nft",
    pretrained={"model": "black-forest-labs/FLUX.2-klein-base-4B"},
    sample={"num_steps": 8, "eval_num_steps": 28, "eta": 0.0, "guidance_scale": 4.0},
    train={
        "learning_rate": 1e-4,
        "gradient_accumulation_steps": 24,
        "timestep_fraction": 2 / 8,
        "timestep_selection": "stratified",
        "timestep_span": 0.5,
        "timestep_shared": True,
    },
    ddpo={"timestep_window": 0, "timestep_window_latest_start": 0},
    nft={"beta": 0.1},
)
# One GPU holds either klein recipe unsharded (bench.gpu_families, estimates: 35.3 GB at 4 samples a forward, up to
# 12 on 80 GB; the -1gpu variants put 1 (GRPO) or 2 (NFT) through a forward): the same epoch and effective batch on
# one process.
FAMILY_PRESETS.update(
    {
        f"{name}-1gpu": one_gpu(FAMILY_PRESETS[name], 8)
        for name in ("flux2-klein-pickscore-grpo", "flux2-klein-pickscore-nft")
    }
)
# Qwen-Image (Qwen/Qwen-Image, trainer/families/qwenimage.py; here beside tiny-qwenimage, recipes.py being full).
# Flow-GRPO-Fast as flow_grpo runs it (config/grpo.py pickscore_qwenimage, scripts/train_qwenimage.py): groups of
# 16 at 512 px, 10 steps with true CFG 4, SDE noise level 1.2 in a window of 2 steps starting at one of steps 0-3
# (its sde_window_range (0, 5): randint(0, 5 - 2)), the rest ODE, both window steps trained; clip 1e-4, KL 0, EMA
# off, advantages over the epoch's std, LoRA r64/a128 on the attention and both streams' feed-forwards, lr 3e-4,
# gradient checkpointing; per GPU 4 batches of 4 on its 32 GPUs (32 groups an epoch), two optimizer steps an
# epoch. The 20B transformer and the 7B Qwen2.5-VL are sharded (FSDP, as flow_grpo and verl-omni shard both;
# docs/scale.md: 32.74 GB a GPU on 8). PickScore in-process, or served: reward-server and --reward.url.
# Its negative prompt is " "; ours the empty prompt (trainer/families/qwenimage.py).
_QWEN = {
    "run": {"save_freq": 30, "sharding": "fsdp", "shard_text_encoders": True},
    "pretrained": {"model": "Qwen/Qwen-Image"},
    "sample": {"resolution": 512, "guidance_scale": 4.0},
    "train": {"gradient_checkpointing": True},
    "prompt": {"fn": "nouns_activities"},
    "reward": {"scorer": "pickscore"},
}
FAMILY_PRESETS["qwenimage-pickscore-grpo"] = _with(
    _with(_FLOW_GRPO, **_QWEN),
    sample={"eval_num_steps": 50, "eta": 1.2, "batch_size": 4, "num_batches_per_epoch": 4, "images_per_prompt": 16},
    train={
        "batch_size": 4,
        "gradient_accumulation_steps": 2,
        "timestep_fraction": 1.0,
        "kl_coef": 0.0,
        "ema_decay": 0.0,
        "lora_rank": 64,
        "lora_alpha": 128.0,
        "lora_targets": _QWEN_LORA,
    },
    ddpo={"clip_range": 1e-4, "timestep_window": 2, "timestep_window_latest_start": 3},
)
# DiffusionNFT's SD3.5-M PickScore recipe (NVlabs/DiffusionNFT config/nft.py, as sd3-pickscore-nft) on Qwen-Image at
# 512 px: 48 groups of 24 from the deterministic sampler without guidance, 10 steps, KL 1e-4, EMA 0.9, LoRA
# r32/a64 on the joint attention, one optimizer step an epoch (1152 samples), in flow_grpo's per-GPU batches of 4
# on 8 GPUs (36 sampling batches, 36 accumulations), sharded as above. Unmeasured.
FAMILY_PRESETS["qwenimage-pickscore-nft"] = _with(
    _with(RECIPES["sd3-pickscore-nft"], **_QWEN),
    sample={"guidance_scale": 1.0, "batch_size": 4, "num_batches_per_epoch": 36},
    train={"batch_size": 4, "gradient_accumulation_steps": 36},
)

# Flow-Factory's Z-Image GRPO example (github.com/X-GenGroup/Flow-Factory, examples/grpo/lora/z_image/default.yaml)
# on Tongyi-MAI/Z-Image: 48 prompts x groups of 16 an epoch at 512 px, 10 steps, guidance 4 in ZImagePipeline's
# convention (5 in ours: trainer/families/zimage.py), Flow-GRPO's SDE at noise 0.7 on one step per trajectory drawn
# from its sde_steps [1, 2, 3], the rest ODE; clip 1e-4, no KL, advantages within each group (its global_std
# false), two optimizer steps an epoch, lr 3e-4, weight decay 1e-4 (our default),
# gradient norm 1, EMA 0.9 every 4 epochs (8 steps: 0.987 a step), LoRA r64/a128 (fp32) on _ZIMAGE_LORA, bf16;
# evaluated at 40 steps (Flow-Factory's at 1024 px). Its 8 GPUs with per-GPU batches of 1 become, per GPU, 6
# sampling batches of one group and train batches of 4 over 12 accumulation steps (bench.gpu_families: 4 a forward
# need 108 GB without gradient checkpointing, 30 GB with it; docs/scale.md: so on here). PickScore as sd3-pickscore
# (served: --reward.url); nouns_activities stand in for its PickScore prompts.
FAMILY_PRESETS["zimage-pickscore-grpo"] = _with(
    _FLOW_FACTORY_GRPO,
    run={"save_freq": 40},
    pretrained={"model": "Tongyi-MAI/Z-Image"},
    sample={"guidance_scale": 5.0},
    train={
        "group_by": "group",
        "lora_targets": _ZIMAGE_LORA,
        "gradient_checkpointing": True,
    },
    ddpo={"timestep_window": 1, "timestep_window_earliest_start": 1, "timestep_window_latest_start": 3},
)
FAMILY_PRESETS["zimage-pickscore-grpo-1gpu"] = one_gpu(FAMILY_PRESETS["zimage-pickscore-grpo"], 8)

# Wan's LoRA targets (trainer/families/wan.py): every WanTransformerBlock's self- and cross-attention projections
# (attn1, attn2: to_q/k/v, to_out.0), as flow_grpo's Wan2.1 script (scripts/train_wan2_1.py) and Flow-Factory's Wan
# adapter; Wan's T2V blocks have no add_k_proj/add_v_proj (only the I2V image branch does).
_WAN_LORA = ["to_q", "to_k", "to_v", "to_out.0"]
# Wan's shape on CPU (trainer/families/wan.py, tiny_wan.py): wan21-t2v-ocr-grpo in miniature, 5-frame videos
# (2 latent frames) at 48 x 64 px (non-square on purpose), 4 SDE steps at noise 0.7, CFG 4.5 (a second pass on the
# empty prompt), groups of 4, 8 videos an epoch, its LoRA targets; the reward (compression) pools its frame scores
# per video.
FAMILY_PRESETS["tiny-wan"] = {
    "pretrained": {"model": "tiny-wan"},
    "sample": {
        "num_steps": 4,
        "eval_num_steps": 4,
        "eta": 0.7,
        "guidance_scale": 4.5,
        "images_per_prompt": 4,
        "resolution": 48,
        "width": 64,
        "num_frames": 5,
        "batch_size": 4,
        "num_batches_per_epoch": 2,
    },
    "train": {
        "batch_size": 2,
        "timestep_fraction": 0.99,
        "timestep_selection": "first",
        "kl_coef": 0.004,
        "lora_targets": _WAN_LORA,
    },
}
# Flow-GRPO on Wan2.1-T2V-1.3B (github.com/yifan123/flow_grpo, config/grpo.py general_ocr_wan2_1,
# scripts/train_wan2_1.py): 33-frame videos at 240 x 416, 20 SDE steps at noise 0.7, CFG 4.5, groups of 4 in
# sampling batches of 8 (2 a GPU an epoch), one optimizer step per 8 samples (two an epoch), advantages within each
# group (its global_std false), KL beta 0.004, lr 1e-4, clip 1e-3, EMA, LoRA r32/a64 on _WAN_LORA, bf16, evaluated
# at 50 steps. Its reward, video_ocr, is here the image OCR scorer on every frame, mean-pooled per video
# (trainer/rewards.py, scorers/video.py). Its GPU count is not in the config: 8 here (_FLOW_GRPO's). The real
# checkpoint's UniPC scheduler samples as flow Euler at its flow_shift 3 (trainer/families/wan.py). Gradient
# checkpointing on: 8 videos a forward need 176 GB without it, 24 GB with it (bench.gpu_families, docs/scale.md).
FAMILY_PRESETS["wan21-t2v-ocr-grpo"] = _with(
    _FLOW_GRPO,
    pretrained={"model": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"},
    sample={
        "num_steps": 20,
        "eval_num_steps": 50,
        "guidance_scale": 4.5,
        "resolution": 240,
        "width": 416,
        "num_frames": 33,
        "batch_size": 8,
        "num_batches_per_epoch": 2,
        "images_per_prompt": 4,
    },
    train={
        "batch_size": 8,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4,
        "kl_coef": 0.004,
        "group_std": "group",
        "lora_targets": _WAN_LORA,
        "gradient_checkpointing": True,
    },
    ddpo={"clip_range": 1e-3},
    reward={"scorer": "ocr"},
    prompt={"fn": "ocr", "eval_path": RECIPES["sd3-ocr"]["prompt"]["eval_path"]},
)
# DiffusionNFT's sd3-pickscore-nft settings (trainer/config/recipes.py) on Wan2.1-T2V-1.3B at Flow-Factory's Wan
# video size (examples/grpo/full/wan22/t2v.yaml: 256 px, 5 frames), LoRA on _WAN_LORA. UNMEASURED: no published
# DiffusionNFT run on Wan; a starting point, not a reproduction.
FAMILY_PRESETS["wan21-t2v-pickscore-nft"] = _with(
    RECIPES["sd3-pickscore-nft"],
    pretrained={"model": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"},
    sample={"resolution": 256, "num_frames": 5},
    train={"lora_targets": _WAN_LORA},
)
# One GPU holds it unsharded (bench.gpu_families, estimates: 30.7 GB at its 9 samples a forward, up to 32 on 80 GB).
FAMILY_PRESETS["wan21-t2v-pickscore-nft-1gpu"] = one_gpu(FAMILY_PRESETS["wan21-t2v-pickscore-nft"], 8)
# Flow-Factory's Wan2.2-A14B GRPO example (github.com/X-GenGroup/Flow-Factory, examples/grpo/lora/wan22/t2v.yaml):
# 48 groups of 16 an epoch, 5 frames at 480 px, 10 steps, CFG 4.0 on the high-noise expert and 3.0 on the low-noise
# one, Flow-SDE noise 0.9 on one step a trajectory, clip 1e-4, no KL, lr 1e-4, weight decay 1e-4, two optimizer
# steps an epoch, advantages within each group, EMA 0.9 every 4 epochs (8 steps: 0.987 a step), LoRA r64/a128,
# PickScore, bf16, evaluated at 28 steps; LoRA on both experts (pretrained.train_experts both), the SDE step drawn
# from steps 1-3 (step 3, t 858 < 875, is the low-noise expert's). Its 8 GPUs with per-GPU batches of 1 become,
# per GPU, 6 sampling batches of one group and train batches of 4 over 12 accumulation steps (bench.gpu_families:
# no card holds it without gradient checkpointing; with it, fsdp on 2 or more GPUs: both on here; docs/scale.md).
# nouns_activities stand in for its PickScore prompts.
FAMILY_PRESETS["wan22-t2v-pickscore-grpo"] = _with(
    _FLOW_FACTORY_GRPO,
    run={"save_freq": 20, "sharding": "fsdp"},
    pretrained={"model": "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "train_experts": "both"},
    sample={
        "num_steps": 10,
        "eval_num_steps": 28,
        "eta": 0.9,
        "guidance_scale": 4.0,
        "guidance_scale_2": 3.0,
        "resolution": 480,
        "num_frames": 5,
    },
    train={
        "learning_rate": 1e-4,
        "group_by": "group",
        "lora_targets": _WAN_LORA,
        "gradient_checkpointing": True,
    },
    ddpo={"timestep_window": 1, "timestep_window_earliest_start": 1, "timestep_window_latest_start": 3},
)
