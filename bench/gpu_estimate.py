"""GPU memory and compute of one training step per model family, estimated without a GPU: DDPO's and the
forward-process methods' (DiffusionNFT, AWM).

    python -m bench.gpu_estimate [--families sd15,sdxl,sd3,flux] [--resolutions 512,1024] [--out FILE] [--quick]

Each denoiser (SD1.5's and SDXL's UNet, SD3.5-Medium's MMDiT, FLUX.1-dev's transformer) is built random-init
from its published config on the meta device with the trainer's LoRA adapters (trainer.families.models.make_trainable:
frozen base in half, adapters in fp32) and made fake (FakeTensorMode: shapes, dtypes, storages, no data). ONE step
of the DDPO hot path then runs as trainer/algorithms/ddpo/loop.py runs it: the family's own predict with
classifier-free guidance (batch doubled; FLUX.1-dev's guidance is an input, one pass), its step's Gaussian (DDIM for
SD1/SDXL, Flow-GRPO's SDE for SD3 and FLUX) and the log-prob of the stored next latent, PPO-clip, backward, gradient
clipping, AdamW; with and without gradient checkpointing. DiffusionNFT's and AWM's step as
trainer/algorithms/forward/loop.py runs it: clean latents re-noised at a sampler step, the conditional prediction
with gradient (no guidance), the lagging weights' and the base's without, NFT's loss, backward, clipping, AdamW
(AWM's step has the same
forwards and an elementwise loss: the same memory and FLOPs). Also the sampling step alone (no grad) and the
VAE decode of a sampled batch; and the GenEval and OCR scorers' memory.

``LiveBytes`` (a TorchDispatchMode) keeps the bytes of every live storage, in the CUDA caching allocator's
512-byte blocks, until a weak reference says it died; at the peak it notes which were alive and later names
them weights, inputs, gradients, optimizer state or (the rest) activations. FLOPs are FlopCounterMode's
formulas; FlopCounterMode itself is not used: its module tracker's hooks keep checkpointed activations alive.

Fake CPU tensors, not fake CUDA ones: a CPU-only torch cannot run fake CUDA tensors (it has no CUDA device
guard for indexing and autograd, and autocast("cuda") turns itself off). Sizes do not depend on the device;
autocast's dtype policy does, so ``CudaAutocast`` applies CUDA's lists (aten/src/ATen/autocast_mode.h: convs
and matmuls in half, norms, exp and pow in fp32, so GroupNorm outputs fp32 as on a GPU), and attention runs
CPU's fused flash kernel, which keeps for backward what CUDA's flash kernel keeps (q, k, v, out, logsumexp).

The families added in 2026 (FLUX.2-klein, Qwen-Image, Wan2.1/2.2, Z-Image) are estimated per recipe by
bench/gpu_families.py (their configs in bench/gpu_family_models.py), on this module's step and bench/shard_estimate.py's
arithmetic.

Calibration runs the same code on the repo's tiny models, fake and for real on the CPU, where the CPU
allocator's own events (torch.profiler, profile_memory) give the measured peak.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import time
import weakref
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from trainer.families.ddim import ddim_mean_std, gaussian_log_prob
from trainer.families.flow import flow_sde_mean_std
from trainer.algorithms.ddpo.loss import ppo_clip_loss
from trainer.algorithms.forward.loss import nft_loss, nft_optimality

GB = 1e9
CARDS_GB = (24, 40, 80)
CONTEXT_GB, FRAGMENTATION = 1.5, 0.10  # left free on every card: CUDA context, cuDNN/cuBLAS workspaces, fragmentation
BLOCK = 512  # the CUDA caching allocator rounds each allocation up to 512 bytes (c10/cuda/CUDACachingAllocator.cpp)
CATEGORIES = ("weights", "inputs", "activations", "gradients", "optimizer_state")

# -- published configs (no weights needed) -----------------------------------------------------------------
# huggingface.co/runwayml/stable-diffusion-v1-5/blob/main/unet/config.json (diffusers' UNet2DConditionModel
# defaults are SD1's blocks; cross-attention on CLIP ViT-L/14's 768).
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
# huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/unet/config.json (as quoted in
# github.com/AI-Hypercomputer/maxdiffusion's SDXL UNet test).
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
# huggingface.co/stabilityai/stable-diffusion-3.5-medium/blob/main/transformer/config.json (MMDiT-X: dual
# attention in the first 13 blocks, RMS qk-norm).
SD35M_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}
# huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/transformer/config.json: 19 double- and 38 single-stream
# blocks, 24 heads of 128, guidance as an input.
FLUX_DEV_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
# The VAEs (the same config files' vae/ folders): SD1.5's and SDXL's f8 4-channel VAE, SD3's 16-channel one.
SD_VAE = {
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
}
SD3_VAE = {
    **SD_VAE,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
}
FLUX_VAE = {**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}
# The frozen text encoders, which trainer.families.models.load_family keeps on the GPU too: CLIP ViT-L/14's
# (openai/clip-vit-large-patch14), OpenCLIP bigG's and T5 v1.1-XXL's encoder (google/t5-v1_1-xxl), as the
# pipelines' text_encoder, text_encoder_2 and text_encoder_3 (pretrained.load_t5 false drops the last).
CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
}
CLIP_G = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
T5_XXL = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
}

# name: denoiser config and dtype, resolutions, the preset whose sampling and LoRA settings apply, the VAE
# (config, dtype: SDXL's runs in fp32, its force_upcast) and the text encoders.
_L, _G, _T5 = (
    ("CLIPTextModelWithProjection", CLIP_L),
    ("CLIPTextModelWithProjection", CLIP_G),
    ("T5EncoderModel", T5_XXL),
)
TRAIN_KINDS = ("train", "train_checkpointed", "forward_train", "forward_train_checkpointed")  # DDPO's, NFT's / AWM's
FAMILIES = {
    "sd15": dict(
        config=SD15_UNET,
        dtype=torch.float16,
        resolutions=(512,),
        preset="sd15-compressibility",
        vae=(SD_VAE, torch.float16),
        text=[("CLIPTextModel", CLIP_L)],
    ),
    "sdxl": dict(
        config=SDXL_UNET,
        dtype=torch.float16,
        resolutions=(1024,),
        preset="sdxl-compressibility",
        vae=(SD_VAE, torch.float32),
        text=[("CLIPTextModel", CLIP_L), _G],
    ),
    "sd3": dict(
        config=SD35M_TRANSFORMER,
        dtype=torch.bfloat16,
        resolutions=(512, 1024),
        preset="sd3-pickscore",
        vae=(SD3_VAE, torch.bfloat16),
        text=[_L, _G, _T5],
    ),
    # T5-XXL on the GPU beside the transformer, as trainer.families.models.load_family keeps every frozen module
    "flux": dict(
        config=FLUX_DEV_TRANSFORMER,
        dtype=torch.bfloat16,
        resolutions=(512, 1024),
        preset="flux-pickscore-grpo",
        vae=(FLUX_VAE, torch.bfloat16),
        text=[("CLIPTextModel", CLIP_L), _T5],
    ),
}


# -- accounting ----------------------------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Bytes of every live storage (each counted once, however many views), and which were live at the peak."""

    def __init__(self, block: int = 1):
        super().__init__()
        self.block, self.serials, self.flops = block, itertools.count(), 0
        self.live: dict[int, tuple[int, int, weakref.ref]] = {}  # storage address -> (serial, bytes, weak ref)
        self.labels: dict[int, str] = {}  # serial -> category
        self.current = self.peak = 0
        self.at_peak: dict = {}

    def add(self, tensor: torch.Tensor, label: str | None = None) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.live:
            size = -(-storage.nbytes() // self.block) * self.block
            self.live[key] = (next(self.serials), size, weakref.ref(storage, functools.partial(self._freed, key)))
            self.current += size
        if label:
            self.labels[self.live[key][0]] = label

    def _freed(self, key: int, _ref) -> None:
        self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_formulas().get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        if self.current > self.peak:
            self.peak, self.at_peak = self.current, self.live.copy()
        return out

    def peak_by_category(self) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for serial, size, _ in self.at_peak.values():
            out[self.labels.get(serial, "activations")] += size
        return out


class CudaAutocast(TorchFunctionMode):
    """CUDA autocast's dtype policy (aten/src/ATen/autocast_mode.h), applied at the torch-function level as
    autocast applies it above autograd: the casts are recorded, so backward keeps what a GPU keeps."""

    LOWER = {
        F.linear,
        F.conv1d,
        F.conv2d,
        F.conv3d,  # Wan's patch embedding (bench/gpu_families.py)
        torch.matmul,
        torch.Tensor.matmul,
        torch.bmm,
        torch.baddbmm,
        torch.mm,
        torch.addmm,
        F.scaled_dot_product_attention,
    }
    FP32 = {
        F.group_norm,
        F.layer_norm,
        torch.exp,
        torch.Tensor.exp,
        torch.pow,
        torch.Tensor.pow,
        torch.Tensor.__pow__,
        torch.rsqrt,
        torch.Tensor.rsqrt,
        torch.log,
        torch.Tensor.log,
    }
    FP32_OUT = {F.softmax, torch.softmax, torch.Tensor.softmax, torch.sum, torch.Tensor.sum}  # fp32_set_opt_dtype

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = self.dtype if func in self.LOWER else torch.float32 if func in self.FP32 else None
        if target is not None:

            def cast(t):
                return t.to(target) if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, self.dtype) else t

            args, kwargs = [cast(a) for a in args], {k: cast(v) for k, v in kwargs.items()}
        elif (
            func in self.FP32_OUT
            and isinstance(args[0], torch.Tensor)
            and args[0].dtype == self.dtype
            and kwargs.get("dtype") is None
        ):
            kwargs = {**kwargs, "dtype": torch.float32}
        return func(*args, **kwargs)


@functools.cache
def flop_formulas() -> dict:
    """torch.utils.flop_counter's formulas (FlopCounterMode's own), CPU's flash attention counted as CUDA's.
    FlopCounterMode itself is not used: its module tracker's hooks keep checkpointed activations alive."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    return {
        **fc.flop_registry,
        aten._scaled_dot_product_flash_attention_for_cpu: fc.shape_wrapper(
            lambda q, k, v, *args, out_shape=None, **kwargs: fc.sdpa_flop_count(q, k, v)
        ),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: fc.shape_wrapper(
            lambda grad, q, k, v, *args, out_shape=None, **kwargs: fc.sdpa_backward_flop_count(grad, q, k, v)
        ),
    }


def measure(step, model=None, optimizer=None, inputs=(), block: int = 1, profile: bool = False) -> dict:
    """Run ``step()`` once: its peak bytes, by category, and its FLOPs. ``profile`` (real tensors) also takes
    the peak from the CPU allocator's own events (torch.profiler, profile_memory)."""
    tracker = LiveBytes(block)
    weights = [*model.parameters(), *model.buffers()] if model is not None else []

    def states():
        return (
            [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
            if optimizer
            else []
        )

    for label, tensors in (("weights", weights), ("inputs", tree_leaves(inputs)), ("optimizer_state", states())):
        for t in tensors:
            tracker.add(t, label)
    start, tracker.peak, tracker.at_peak = tracker.current, tracker.current, tracker.live.copy()
    with (
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        if profile
        else contextlib.nullcontext() as prof,
        tracker,
    ):
        step()
    for label, tensors in (
        ("gradients", [p.grad for p in weights if p.grad is not None]),
        ("optimizer_state", states()),
    ):
        for t in tensors:
            tracker.add(t, label)
    result = {"peak": tracker.peak, "by_category": tracker.peak_by_category(), "flops": tracker.flops}
    if profile:  # what the allocator handed out beyond what was live at the start, in time order
        events = sorted(
            (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
        )
        result["allocator_peak"] = start + max(itertools.accumulate(n for _, n in events), default=0)
    return result


# -- the models and the step ---------------------------------------------------------------------------------
def denoiser(config: dict, dtype: torch.dtype, lora: dict | None, fake=None, pretrained: str | None = None, cls=None):
    """The denoiser in ``dtype`` with LoRA adapters in fp32, as trainer.families.models.make_trainable makes it:
    random-init on the meta device, then fake (``fake``: a FakeTensorMode), or ``pretrained``'s weights.
    ``lora`` None: no adapters, every weight trained in ``dtype`` (a full finetune's compute copy); ``cls``: the
    diffusers class where the config's keys do not name it (bench/shard_estimate.py's Qwen-Image)."""
    import diffusers
    from peft import LoraConfig

    cls = cls or (
        diffusers.FluxTransformer2DModel
        if "num_single_layers" in config
        else diffusers.SD3Transformer2DModel
        if "joint_attention_dim" in config
        else diffusers.UNet2DConditionModel
    )
    with contextlib.nullcontext() if pretrained else torch.device("meta"):
        model = cls.from_pretrained(pretrained) if pretrained else cls.from_config(config)
    model.requires_grad_(lora is None).to(dtype)
    if lora is not None:
        model.add_adapter(
            LoraConfig(
                r=lora["lora_rank"],
                lora_alpha=lora["lora_alpha"],
                init_lora_weights="gaussian",
                target_modules=lora["lora_targets"],
            )
        )
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if fake is not None:
        with fake:
            model.to_empty(device="cpu")
    return model.train()


def frozen_bytes(cls_name: str, config: dict, dtype: torch.dtype) -> int:
    """Bytes of a frozen text encoder's weights, built on the meta device from its config."""
    import transformers

    config_cls = transformers.T5Config if cls_name.startswith("T5") else transformers.CLIPTextConfig
    with torch.device("meta"):
        return (
            sum(p.numel() for p in getattr(transformers, cls_name)(config_cls(**config)).parameters()) * dtype.itemsize
        )


class Step:
    """One family's DDPO step (trainer/algorithms/ddpo/loop.py's inner loop) on a batch of stored transitions."""

    def __init__(self, model, dtype: torch.dtype, sample: dict, train: dict, tokens: int = 512):
        """``tokens``: FLUX's T5 tokens per prompt (pretrained.max_sequence_length)."""
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

        from trainer.families.ddim import DDIM
        from trainer.families.flow import FlowMatching
        from trainer.families.flux import Flux
        from trainer.families.sd1 import SD1
        from trainer.families.sd3 import SD3
        from trainer.families.sdxl import SDXL

        self.model, self.dtype, self.sample, self.train, c = model, dtype, sample, train, model.config
        self.flow, self.flux = "joint_attention_dim" in c, "num_single_layers" in c
        self.family = SD3 if self.flow else SDXL if c.get("addition_embed_type") == "text_time" else SD1
        self.latent_channels = c.in_channels // 4 if self.flux else c.in_channels  # FLUX packs 2x2 patches of 16
        if self.flux:  # FLUX.1-dev's scheduler (shift by image size) through the family itself: its predict is a method
            self.scheduler = FlowMatchEulerDiscreteScheduler(
                use_dynamic_shifting=True,
                base_shift=0.5,
                max_shift=1.15,
                base_image_seq_len=256,
                max_image_seq_len=4096,
            )
            self.pipe = SimpleNamespace(
                transformer=model,
                scheduler=self.scheduler,
                vae=None,
                vae_scale_factor=8,
                tokenizer_2=SimpleNamespace(model_max_length=tokens),
            )
            self.family = Flux(self.pipe, resolution=512, guidance=sample["guidance_scale"])  # inputs() remakes it
            self.schedule = self.family.dynamics
            return
        if self.flow:  # SD3.5's scheduler (shift 3): the flow step needs its sigmas
            self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        else:  # SD1.5's DDIM schedule (runwayml/stable-diffusion-v1-5/scheduler, as trainer/families/tiny_pipeline.py)
            self.scheduler = DDIMScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                clip_sample=False,
                set_alpha_to_one=False,
                steps_offset=1,
            )
        self.scheduler.set_timesteps(sample["num_steps"])
        self.schedule = (FlowMatching if self.flow else DDIM)(self.scheduler)  # the dynamics' x_t and x0 formulas

    def inputs(self, n: int, resolution: int) -> dict:
        """What the step reads from the stored trajectories: x_t, x_{t-1}, timesteps, conditioning, log-probs."""
        c, size, h = self.model.config, resolution // 8, lambda *shape: torch.randn(*shape, dtype=self.dtype)
        if self.flux:  # FLUX: T5's tokens, CLIP's pooled output; the schedule of this size
            cond = {
                "prompt_embeds": h(n, self.family.max_sequence_length, c.joint_attention_dim),
                "pooled_projections": h(n, c.pooled_projection_dim),
            }
            from trainer.families.flux import Flux

            self.family = Flux(self.pipe, resolution=resolution, guidance=self.sample["guidance_scale"])
            self.schedule = self.family.dynamics
            self.schedule.timesteps(self.sample["num_steps"], "cpu")
        elif self.flow:  # CLIP's 77 tokens then T5's 256 (StableDiffusion3Pipeline.encode_prompt)
            cond = {
                "prompt_embeds": h(n, 77 + 256, c.joint_attention_dim),
                "pooled_projections": h(n, c.pooled_projection_dim),
            }
        elif self.family.__name__ == "SDXL":  # pooled width: the text_time input less the six time ids' embeddings
            cond = {
                "prompt_embeds": h(n, 77, c.cross_attention_dim),
                "time_ids": h(n, 6),
                "text_embeds": h(n, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim),
            }
        else:
            cond = h(n, 77, c.cross_attention_dim)
        index, latents = self.sample["num_steps"] // 2, torch.randn(n, self.latent_channels, size, size)
        return {
            "latents": latents,
            "next_latents": torch.randn_like(latents),
            "cond": cond,
            "negative": {k: v[:1].clone() for k, v in cond.items()} if isinstance(cond, dict) else cond[:1].clone(),
            "timesteps": self.scheduler.timesteps[index].expand(n).clone(),
            "steps": torch.full((n,), index),
            "old_log_probs": torch.zeros(n),
            "advantages": torch.ones(n),
        }

    def log_prob(self, b: dict) -> torch.Tensor:
        guidance, eta = self.sample["guidance_scale"], self.sample["eta"]
        with CudaAutocast(self.dtype):
            output = self.family.predict(self.model, b["latents"], b["timesteps"], b["cond"], b["negative"], guidance)
            if self.flow:
                mean, std = flow_sde_mean_std(self.scheduler.sigmas, b["steps"], output, b["latents"], noise_level=eta)
            else:
                mean, std = ddim_mean_std(self.scheduler, output, b["timesteps"], b["latents"], eta)
            return gaussian_log_prob(b["next_latents"], mean, std)

    def train_step(self, b: dict, optimizer) -> None:
        loss, _ = ppo_clip_loss(
            self.log_prob(b), b["old_log_probs"], b["advantages"], self.train["clip_range"], self.train["adv_clip_max"]
        )
        self.optimize(loss, optimizer)

    def forward_step(self, b: dict, optimizer) -> None:
        """DiffusionNFT's step (trainer/algorithms/forward/loop.py): the rollout's clean latents (here ``latents``) at a
        sampler step, the lagging and the base prediction without gradient (each the same denoiser's forward: swapped
        LoRA tensors, adapters off), the trained one with; NFT's loss and its KL to the base."""
        x_t, t, _, _ = self.schedule.noised_at(b["latents"], b["next_latents"], b["steps"])
        with CudaAutocast(self.dtype):
            with torch.no_grad():
                lagging = self.family.predict(self.model, x_t, t, b["cond"], None, 1.0).float()
                reference = self.family.predict(self.model, x_t, t, b["cond"], None, 1.0).float()
            prediction = self.family.predict(self.model, x_t, t, b["cond"], None, 1.0).float()
        r = nft_optimality(b["advantages"], self.train["adv_clip_max"])
        loss, _ = nft_loss(
            prediction,
            lagging,
            b["latents"],
            lambda p: self.schedule.predicted_x0(p, b["steps"], x_t),
            r,
            1.0,
            self.train["adv_clip_max"],
        )
        self.optimize(loss + 1e-4 * ((prediction - reference) ** 2).mean(), optimizer)

    def optimize(self, loss: torch.Tensor, optimizer) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], self.train["max_grad_norm"])
        optimizer.step()

    def sampling_step(self, b: dict) -> None:
        with torch.no_grad():
            self.log_prob(b)


def checkpointing_under(dtype: torch.dtype):
    """diffusers' default gradient checkpointing (torch.utils.checkpoint, non-reentrant), recomputing in
    backward under CudaAutocast again, as torch.utils.checkpoint recomputes under the forward's autocast."""

    def run(module, *args):
        if any(isinstance(m, CudaAutocast) for m in torch.overrides._get_current_function_mode_stack()):
            return module(*args)
        with CudaAutocast(dtype):
            return module(*args)

    return lambda module, *args: torch.utils.checkpoint.checkpoint(run, module, *args, use_reentrant=False)


def run_step(
    step: Step,
    kind: str,
    n: int,
    resolution: int,
    fake,
    block: int = BLOCK,
    checkpointing: bool = False,
    profile: bool = False,
) -> dict:
    """Measure one train or sampling step of batch ``n`` (on fake tensors when ``fake`` is a FakeTensorMode)."""
    model = step.model
    if checkpointing:
        model.enable_gradient_checkpointing(checkpointing_under(step.dtype))
    else:
        model.disable_gradient_checkpointing()
    with fake if fake is not None else torch.device("cpu"):
        optimizer = None
        if kind != "sampling":  # AdamW with its state made once, as every step after the first finds it
            optimizer = torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad], lr=3e-4, weight_decay=1e-4
            )
            for p in optimizer.param_groups[0]["params"]:
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        batch = step.inputs(n, resolution)
        run = {"train": step.train_step, "forward_train": step.forward_step}.get(kind)
        result = measure(
            lambda: run(batch, optimizer) if run else step.sampling_step(batch), model, optimizer, batch, block, profile
        )
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
    return result


def run_decode(step: Step, vae, n: int, resolution: int, fake) -> dict:
    """Measure the family's decode of ``n`` sampled latents (trainer/algorithms/ddpo/loop.py decodes each sampling batch
    whole, outside autocast, in the VAE's own dtype)."""
    from trainer.families.vae import VAE

    decoder = VAE(vae)  # every family's decode (trainer/families/vae.py)
    with fake, torch.no_grad():
        latents = torch.randn(n, vae.config.latent_channels, resolution // 8, resolution // 8)
        return measure(lambda: decoder.decode(latents), vae, None, [latents], BLOCK)


# -- the report ------------------------------------------------------------------------------------------------
def gb(nbytes: float) -> float:
    return round(nbytes / GB, 3)


def largest_batch(need_1: float, per_sample: float, card_gb: float) -> int:
    """The largest n whose need_1 + (n - 1) per_sample bytes fit a card of ``card_gb`` less the margin."""
    usable = (card_gb - CONTEXT_GB) / (1 + FRAGMENTATION) * GB
    return 0 if need_1 > usable else int((usable - need_1) // max(per_sample, 1)) + 1


def summary(one: dict, two: dict) -> dict:
    """Batch 1's peak by category, what each further sample adds (batch 2 less batch 1), FLOPs per sample."""
    return {
        "batch1_gb": {**{k: gb(v) for k, v in one["by_category"].items()}, "total": gb(one["peak"])},
        "per_sample_gb": {
            **{k: gb(two["by_category"][k] - v) for k, v in one["by_category"].items()},
            "total": gb(two["peak"] - one["peak"]),
        },
        "tflop_per_sample": round(one["flops"] / 1e12, 3),
    }


def training(preset: dict) -> dict:
    """A preset's train settings with DDPO's own (its clip range), which live in the ddpo group."""
    return {**preset["train"], **preset.get("ddpo", {})}


def estimate(name: str, resolutions, fake) -> dict:
    """Every figure of one family, at each resolution."""
    from diffusers import AutoencoderKL

    from trainer.config.presets import PRESETS

    family, preset = FAMILIES[name], PRESETS[FAMILIES[name]["preset"]]
    model = denoiser(family["config"], family["dtype"], preset["train"], fake)
    step = Step(
        model,
        family["dtype"],
        preset["sample"],
        training(preset),
        preset.get("pretrained", {}).get("max_sequence_length") or 512,
    )
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(family["vae"][0]).to(family["vae"][1])
    with fake:
        vae.to_empty(device="cpu")
    frozen = {
        f"text_encoder{f'_{i + 1}' if i else ''}": frozen_bytes(cls, config, family["dtype"])
        for i, (cls, config) in enumerate(family["text"])
    } | {"vae": sum(p.nbytes for p in vae.parameters())}
    out = {}
    for res in resolutions:
        runs = {
            key: [run(n) for n in (1, 2)]
            for key, run in {
                "sampling": lambda n: run_step(step, "sampling", n, res, fake),
                "train": lambda n: run_step(step, "train", n, res, fake),
                "train_checkpointed": lambda n: run_step(step, "train", n, res, fake, checkpointing=True),
                "forward_train": lambda n: run_step(step, "forward_train", n, res, fake),
                "forward_train_checkpointed": lambda n: run_step(
                    step, "forward_train", n, res, fake, checkpointing=True
                ),
                "decode": lambda n: run_decode(step, vae, n, res, fake),
            }.items()
        }
        # What the card holds at batch 1 and per further sample: the other frozen modules beside the step, and for
        # sampling also the decode of the batch beside the denoiser's weights.
        lines = {
            key: (sum(frozen.values()) + one["peak"], two["peak"] - one["peak"]) for key, (one, two) in runs.items()
        }
        weights = runs["train"][0]["by_category"]["weights"]
        lines["decode"] = (lines["decode"][0] - frozen["vae"] + weights, lines["decode"][1])
        with fake:
            cond = sum(t.nbytes for t in tree_leaves(step.inputs(1, res)["cond"]))
        latent = 4 * step.latent_channels * (res // 8) ** 2

        def fits(key, card):
            return min(largest_batch(*lines[k], card) for k in ([key, "decode"] if key == "sampling" else [key]))

        out[f"{name}@{res}"] = {
            "denoiser": type(model).__name__,
            "dtype": str(family["dtype"]).removeprefix("torch."),
            "params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
            "lora_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "lora": {k: preset["train"][k] for k in ("lora_rank", "lora_alpha", "lora_targets")},
            "other_frozen_gb": {k: gb(v) for k, v in frozen.items()},
            **{key: summary(*pair) for key, pair in runs.items()},
            "need_gb_at_batch1": {
                **{k: gb(lines[k][0]) for k in TRAIN_KINDS},
                "sampling": gb(max(lines["sampling"][0], lines["decode"][0])),
            },
            # trainer/sampling.py's Trajectories keep each sample's path of T + 1 latents (fp32) and conditioning;
            # DiffusionNFT and AWM keep only the clean latents
            "trajectory_mb_per_sample": round(((preset["sample"]["num_steps"] + 1) * latent + cond) / 1e6, 3),
            "clean_latents_mb_per_sample": round((latent + cond) / 1e6, 3),
            "largest_batch": {f"{card}GB": {k: fits(k, card) for k in (*TRAIN_KINDS, "sampling")} for card in CARDS_GB},
        }
    return out


# -- the scorers ----------------------------------------------------------------------------------------------
def _fake_model(cls, config, dtype: torch.dtype, fake):
    with torch.device("meta"):
        model = cls(config)
    model.requires_grad_(False).to(dtype).eval()
    with fake:
        model.to_empty(device="cpu")
    return model


def scorers(fake, batch: int = 16) -> dict:
    """The GenEval and OCR scorers' GPU memory in fp16/bf16 beside the trainer's (or on a GPU of their own):
    weights, and the peak of one batch (``batch`` images, their max_batch) through the detector at mmdet's
    800 px test scale / GOT-OCR2's 1024 px input, on fake tensors as the denoiser's."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        GotOcr2Config,
        GotOcr2ForConditionalGeneration,
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
    )

    clip = CLIPConfig(
        text_config=CLIP_L,
        vision_config={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "patch_size": 14,
        },
        projection_dim=768,
    )
    detector = _fake_model(Mask2FormerForUniversalSegmentation, Mask2FormerConfig(num_labels=80), torch.float16, fake)
    reader = _fake_model(GotOcr2ForConditionalGeneration, GotOcr2Config(), torch.bfloat16, fake)
    with torch.device("meta"):
        clip_bytes = sum(p.numel() for p in CLIPModel(clip).parameters()) * 2

    def read(pixels, ids):  # the prompt's forward with the image tokens in place (generate's first step)
        image = reader.model.get_image_features(pixel_values=pixels)
        image = getattr(image, "pooler_output", image).reshape(len(ids), -1, reader.config.text_config.hidden_size)
        text = reader.model.get_input_embeddings()(ids)
        hidden = reader.model.language_model(
            inputs_embeds=torch.cat([text[:, :1], image, text[:, 1:]], 1)
        ).last_hidden_state
        return reader.lm_head(hidden[:, -1:])

    out = {}
    with fake, torch.no_grad():
        for n in (1, batch):
            pixels, ids = torch.randn(n, 3, 800, 800, dtype=torch.float16), torch.zeros(n, 30, dtype=torch.long)
            geneval = measure(lambda: detector(pixel_values=pixels), detector, None, [pixels], BLOCK)
            pixels = torch.randn(n, 3, 1024, 1024, dtype=torch.bfloat16)
            ocr = measure(lambda: read(pixels, ids), reader, None, [pixels, ids], BLOCK)
            out[n] = {"geneval": geneval["peak"] + clip_bytes, "ocr": ocr["peak"]}
    rows = {
        "geneval": {
            "models": "Mask2Former Swin-S (COCO instances) + CLIP ViT-L/14, fp16",
            "weights_gb": gb(sum(p.nbytes for p in detector.parameters()) + clip_bytes),
        },
        "ocr": {"models": "GOT-OCR2, bf16", "weights_gb": gb(sum(p.nbytes for p in reader.parameters()))},
    }
    for name, row in rows.items():
        row.update({"need_gb_at_batch1": gb(out[1][name]), f"need_gb_at_batch{batch}": gb(out[batch][name])})
    return rows


PRESET_FAMILY = {
    "runwayml/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stabilityai/stable-diffusion-3.5-medium": "sd3",
    "black-forest-labs/FLUX.1-dev": "flux",
}


def preset_fits(families: dict, card_gb: float = 80.0) -> dict:
    """Each GPU preset's per-GPU batches on a card of ``card_gb``: a training forward (train.batch_size x
    train.timesteps_per_forward samples) and a sampling batch, their need and the margin left."""
    from trainer.config import Config
    from trainer.config.presets import PRESETS
    from trainer.plan import BatchPlan

    out = {}
    for name in PRESETS:
        cfg = Config(preset=name)
        family = PRESET_FAMILY.get(cfg.pretrained.model)
        key = family and f"{family}@{cfg.sample.resolution or FAMILIES[family]['resolutions'][0]}"
        if key not in families:
            continue
        kind = ("forward_train" if cfg.algorithm in ("nft", "awm") else "train") + (
            "_checkpointed" if cfg.train.gradient_checkpointing else ""
        )
        e = families[key]
        train_n = cfg.train.batch_size * max(g.stop - g.start for g in BatchPlan.step_groups_of(cfg))
        sample_n = cfg.sample.batch_size
        slope = max(e["sampling"]["per_sample_gb"]["total"], e["decode"]["per_sample_gb"]["total"])
        needs = {
            "train": e["need_gb_at_batch1"][kind] + (train_n - 1) * e[kind]["per_sample_gb"]["total"],
            "sampling": e["need_gb_at_batch1"]["sampling"] + (sample_n - 1) * slope,
        }
        used = {k: (1 + FRAGMENTATION) * v + CONTEXT_GB for k, v in needs.items()}
        per_sample = (
            e["clean_latents_mb_per_sample" if kind.startswith("forward") else "trajectory_mb_per_sample"] / 1e3
        )
        out[name] = {
            "estimate": key,
            "train_step": kind,
            "train_samples_per_forward": train_n,
            "sampling_batch": sample_n,
            "epoch_store_gb": round(per_sample * sample_n * cfg.sample.num_batches_per_epoch, 4),
            "need_gb": {k: round(v, 2) for k, v in needs.items()},
            f"margin_gb_on_{card_gb:g}gb": {k: round(card_gb - v, 2) for k, v in used.items()},
            "fits": all(v <= card_gb for v in used.values()),
        }
    return out


def calibrate(cache_dir=None, names=("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux"), n: int = 2) -> dict:
    """The same steps on the repo's tiny models (trainer/families/tiny_pipeline.py): estimated on fake tensors, then run
    for real on the CPU, where the tracker and the CPU allocator (torch.profiler) measure the peak."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from trainer.config.presets import PRESETS
    from trainer.families import tiny_pipeline

    models = {
        "tiny-sd": ("tiny_pipeline_path", "unet", "sd15"),
        "tiny-sdxl": ("tiny_sdxl_path", "unet", "sdxl"),
        "tiny-sd3": ("tiny_sd3_path", "transformer", "sd3"),
        "tiny-flux": ("tiny_flux_path", "transformer", "flux"),
    }
    out = {}
    for name in names:
        build, folder, family = models[name]
        path, dtype, (sample, train) = (
            getattr(tiny_pipeline, build)(cache_dir) / folder,
            FAMILIES[family]["dtype"],
            (PRESETS[FAMILIES[family]["preset"]]["sample"], training(PRESETS[FAMILIES[family]["preset"]])),
        )
        config, fake = json.loads((path / "config.json").read_text()), FakeTensorMode(allow_non_fake_inputs=True)
        tokens = tiny_pipeline.FLUX_SPEC["t5_tokens"]
        estimated = Step(denoiser(config, dtype, train, fake), dtype, sample, train, tokens)
        real = Step(denoiser(config, dtype, train, pretrained=str(path)), dtype, sample, train, tokens)
        resolution, out[name] = config.get("sample_size", 8) * 8, {}  # FLUX's transformer records none: 64 px
        for key, kind, checkpointing in (
            ("train", "train", False),
            ("train_checkpointed", "train", True),
            ("forward_train", "forward_train", False),
            ("sampling", "sampling", False),
        ):
            guess = run_step(estimated, kind, n, resolution, fake, 1, checkpointing)
            got = run_step(real, kind, n, resolution, None, 1, checkpointing, profile=True)
            out[name][key] = {
                "batch": n,
                "estimated_bytes": guess["peak"],
                "tracked_real_bytes": got["peak"],
                "allocator_bytes": got["allocator_peak"],
                "rel_error": round(guess["peak"] / got["allocator_peak"] - 1, 4),
                "flops_estimated": guess["flops"],
                "flops_real": got["flops"],
            }
    return out


def main(argv: list[str] | None = None) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, of: " + ", ".join(FAMILIES))
    parser.add_argument("--resolutions", default=None, help="comma-separated px for every family (default: its own)")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    parser.add_argument("--cache-dir", default=None, help="where the tiny calibration models are built")
    parser.add_argument("--quick", action="store_true", help="SD1.5 at 512 px and the tiny SD calibration only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # fake tensors do no arithmetic, and the tiny calibration needs no more
    start, fake = time.perf_counter(), FakeTensorMode(allow_non_fake_inputs=True)
    resolutions = [int(r) for r in args.resolutions.split(",")] if args.resolutions else None
    families = {}
    for name in ["sd15"] if args.quick else args.families.split(","):
        families |= estimate(name, resolutions or ([512] if args.quick else FAMILIES[name]["resolutions"]), fake)
    report = {
        "benchmark": "gpu_estimate",
        "units": "GB = 1e9 bytes; tflop = 1e12 FLOPs (a multiply-add is 2)",
        "margin": {
            "context_gb": CONTEXT_GB,
            "fragmentation": FRAGMENTATION,
            "rule": "a batch fits a card of C GB when (1 + fragmentation) * need + context_gb <= C",
        },
        "method": "fake tensors (FakeTensorMode) under CUDA autocast's dtype policy; live storages in 512-byte blocks",
        "notes": [
            "need = the step's peak + the other frozen modules (text encoders, VAE), all on the GPU as "
            "trainer.families.models.load_family puts them; sampling also decodes its batch with the VAE",
            "not in need: the epoch's stored trajectories, samples per epoch x trajectory_mb_per_sample "
            "(DiffusionNFT and AWM: x clean_latents_mb_per_sample), each preset's epoch_store_gb",
            "train batch = train.batch_size x train.timesteps_per_forward (K timesteps go through one forward)",
            "tflop_per_sample counts both halves of classifier-free guidance (FLUX.1-dev: one pass, its "
            "guidance an input); train_checkpointed adds the recomputation",
            "FLUX: T5-XXL kept on the GPU (9.5 GB of its need), as the trainer keeps it",
        ],
        "families": families,
    }
    if "sd15@512" in families:
        need = families["sd15@512"]["need_gb_at_batch1"]["train"]
        report["targets"] = {
            "sd15_train_batch1_gb": need,
            "target_gb": 7.0,
            "met": need <= 7.0,
            "ddpo_pytorch_claim": "< 10 GB",
        }
    report["presets"] = preset_fits(families)
    if not args.quick:
        report["scorers"] = scorers(fake)
    models = calibrate(
        args.cache_dir, ("tiny-sd",) if args.quick else ("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux")
    )
    report["calibration"] = {
        "method": "the tiny models' steps (batch 2) estimated on fake tensors vs run for real on the CPU; measured: "
        "the CPU allocator's events (torch.profiler profile_memory); rel_error = estimated / measured - 1",
        "max_abs_rel_error": max(abs(c["rel_error"]) for m in models.values() for c in m.values()),
        "models": models,
    }
    report["seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
