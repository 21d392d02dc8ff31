"""The denoisers bench/shard_estimate.py simulates: their published configs, parameter counts, frozen parts, and
the activations of gpu_estimate's step on fake tensors, at full depth with stand-in blocks under gradient
checkpointing, extrapolated in depth without it (the assumptions are in bench/shard_estimate.py's docstring)."""

from __future__ import annotations

import torch

from bench import gpu_estimate as ge

BF16 = 2  # bytes of a bf16 parameter
QWEN_TOKENS = 256  # prompt tokens after the template is dropped (verl-omni's max_seq 256 as the bound)

# huggingface.co/stabilityai/stable-diffusion-3.5-large/blob/main/transformer/config.json: 38 joint blocks of 38
# heads x 64, no dual attention.
SD35L_TRANSFORMER = {
    **ge.SD35M_TRANSFORMER,
    "num_layers": 38,
    "num_attention_heads": 38,
    "caption_projection_dim": 2432,
    "pos_embed_max_size": 192,
    "dual_attention_layers": [],
}
# huggingface.co/Qwen/Qwen-Image/blob/main/transformer/config.json, equal to QwenImageTransformer2DModel's defaults:
# 60 double-stream blocks of 24 heads x 128, Qwen2.5-VL's 3584-wide hidden states in.
QWEN_IMAGE_TRANSFORMER = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}
# huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/main/config.json (8.29e9 parameters)
QWEN25_VL_7B = {
    "text_config": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    },
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
    "tie_word_embeddings": False,
}
# flow_grpo config/grpo.py pickscore_qwenimage: r64 a128 on attention and both MLPs
QWEN_LORA = {
    "lora_rank": 64,
    "lora_alpha": 128.0,
    "lora_targets": [
        *(f"attn.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")),
        "attn.to_add_out",
        *(f"{mlp}.net.{i}" for mlp in ("img_mlp", "txt_mlp") for i in ("0.proj", "2")),
    ],
}
QWEN_SAMPLE = {"num_steps": 10, "guidance_scale": 4.0, "eta": 1.2}  # flow_grpo's: cfg 4, noise_level 1.2


def _sd3_layers(config: dict, counts: dict) -> dict:
    """SD3.5-Medium's first blocks have dual attention: ``counts`` of dual and plain joint blocks."""
    return {
        **config,
        "num_layers": counts["dual"] + counts["plain"],
        "dual_attention_layers": list(range(counts["dual"])),
    }


# name: denoiser config, diffusers class, its FSDP units, its blocks by kind (full depth) and how a config of
# fewer is made; checkpointed: the real blocks (the last of each kind) and how many stand-ins go before which of
# them; the preset whose LoRA and sampling settings apply, the frozen text encoders and VAE
FAMILIES = {
    "flux": dict(
        config=ge.FLUX_DEV_TRANSFORMER,
        cls="FluxTransformer2DModel",
        units=("FluxTransformerBlock", "FluxSingleTransformerBlock"),
        layers={"num_layers": 19, "num_single_layers": 38},
        checkpointed=(
            {"num_layers": 1, "num_single_layers": 1},
            {"transformer_blocks": {0: 18}, "single_transformer_blocks": {0: 37}},
        ),
        preset="flux-pickscore-grpo",
        text=ge.FAMILIES["flux"]["text"],
        vae=ge.FLUX_VAE,
    ),
    "sd35m": dict(
        config=ge.SD35M_TRANSFORMER,
        cls="SD3Transformer2DModel",
        units=("JointTransformerBlock",),
        layers={"dual": 13, "plain": 11},
        checkpointed=({"dual": 1, "plain": 2}, {"transformer_blocks": {0: 12, 1: 9}}),  # the last plain one is pre-only
        shape=_sd3_layers,
        preset="sd3-pickscore",
        text=ge.FAMILIES["sd3"]["text"],
        vae=ge.SD3_VAE,
    ),
    "sd35l": dict(
        config=SD35L_TRANSFORMER,
        cls="SD3Transformer2DModel",
        units=("JointTransformerBlock",),
        layers={"num_layers": 38},
        checkpointed=({"num_layers": 2}, {"transformer_blocks": {0: 36}}),  # the last block is context_pre_only
        preset="sd3-pickscore",
        text=ge.FAMILIES["sd3"]["text"],
        vae=ge.SD3_VAE,
    ),
    "qwen": dict(
        config=QWEN_IMAGE_TRANSFORMER,
        cls="QwenImageTransformer2DModel",
        units=("QwenImageTransformerBlock",),
        layers={"num_layers": 60},
        checkpointed=({"num_layers": 1}, {"transformer_blocks": {0: 59}}),
        preset="sd3-pickscore",  # only its clip range and grad norm (no Qwen-Image preset yet)
        lora=QWEN_LORA,
        frozen=lambda: qwen_frozen(),
    ),
}


def qwen_frozen() -> dict:
    """Bytes of Qwen-Image's frozen modules in bf16: Qwen2.5-VL-7B whole (vision tower and lm_head, as loaded), the
    VAE (AutoencoderKLQwenImage's defaults)."""
    import diffusers
    import transformers

    with torch.device("meta"):
        text = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**QWEN25_VL_7B))
        vae = diffusers.AutoencoderKLQwenImage()
    return {"text_encoder": _numel(text) * BF16, "vae": _numel(vae) * BF16}


# -- the measured activations ---------------------------------------------------------------------------------
class StandIn(torch.nn.Module):
    """A block's stand-in under gradient checkpointing: fresh outputs of its inputs' shapes through a trained scalar,
    so the checkpoint keeps its inputs until its backward as a real block's does, with nothing of its own to
    recompute. The real block of each kind sits last among its kind, where the most inputs are alive."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.bfloat16))

    def forward(self, hidden_states, encoder_hidden_states, *args, **kwargs):
        gelu = torch.nn.functional.gelu
        return gelu(encoder_hidden_states) * self.scale, gelu(hidden_states) * self.scale


class QwenStep(ge.Step):
    """gpu_estimate's DDPO step for Qwen-Image: latents packed 2x2 into 64 channels, Qwen2.5-VL's hidden states
    (``QWEN_TOKENS`` of them, no padding) the only conditioning, true classifier-free guidance as one doubled batch."""

    def __init__(self, model, dtype: torch.dtype, sample: dict, train: dict):
        from diffusers import FlowMatchEulerDiscreteScheduler

        from trainer.families.flow import FlowMatching

        self.model, self.dtype, self.sample, self.train = model, dtype, sample, train
        self.flow, self.flux, self.latent_channels, self.family = True, False, model.config.out_channels, self
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        self.scheduler.set_timesteps(sample["num_steps"])
        self.schedule = FlowMatching(self.scheduler)

    @staticmethod
    def predict(model, latents, timesteps, cond, negative, guidance_scale):
        from trainer.families.sd1 import guided

        def call(x, t, c):
            n, ch, h, w = x.shape
            packed = x.view(n, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w // 4, ch * 4)
            out = model(
                hidden_states=packed,
                encoder_hidden_states=c["prompt_embeds"],
                encoder_hidden_states_mask=None,
                timestep=t / 1000,
                img_shapes=[(1, h // 2, w // 2)] * n,
                return_dict=False,
            )[0]
            return out.view(n, h // 2, w // 2, ch, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, ch, h, w)

        return guided(call, latents, timesteps, cond, negative, guidance_scale)

    def inputs(self, n: int, resolution: int) -> dict:
        cond = {"prompt_embeds": torch.randn(n, QWEN_TOKENS, self.model.config.joint_attention_dim, dtype=self.dtype)}
        index, latents = (
            self.sample["num_steps"] // 2,
            torch.randn(n, self.latent_channels, resolution // 8, resolution // 8),
        )
        return {
            "latents": latents,
            "next_latents": torch.randn_like(latents),
            "cond": cond,
            "negative": {k: v[:1].clone() for k, v in cond.items()},
            "timesteps": self.scheduler.timesteps[index].expand(n).clone(),
            "steps": torch.full((n,), index),
            "old_log_probs": torch.zeros(n),
            "advantages": torch.ones(n),
        }


def _drop_gradient(p: torch.Tensor) -> None:
    """A trained gradient leaves the activations once accumulated: a full finetune's is reduce-scattered and freed,
    LoRA's joins the unsharded fp32 accumulation, which the arithmetic counts apart (accumulated_grads)."""
    p.grad = None


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


class Simulation:
    """The families' parameter counts, frozen parts and measured activations, each computed once."""

    def __init__(self, fake, families: dict | None = None):
        """``families``: shard_models.FAMILIES's entries, or others of the same form (bench/gpu_families.py's adds
        ``frozen``, a function of nothing giving the frozen modules' bytes, and ``step``, one of the model and the
        preset giving the step)."""
        self.fake, self.cache, self.families = fake, {}, families or FAMILIES

    def _once(self, key, compute):
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def model(self, family: str, counts: dict, lora: bool, fake=None):
        """The denoiser with ``counts`` blocks of each kind (meta tensors, or fake with ``fake``)."""
        import diffusers

        from trainer.config.presets import PRESETS

        f = self.families[family]
        config = f.get("shape", lambda c, k: {**c, **k})(f["config"], counts)
        adapters = (f.get("lora") or PRESETS[f["preset"]]["train"]) if lora else None
        model = ge.denoiser(config, torch.bfloat16, adapters, fake, cls=getattr(diffusers, f["cls"]))
        if fake is not None:
            for p in model.parameters():
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(_drop_gradient)
        return model

    def sizes(self, family: str, lora: bool) -> dict:
        def compute():
            model = self.model(family, self.families[family]["layers"], lora)
            units = [m for m in model.modules() if type(m).__name__ in self.families[family]["units"]]
            unit = max(units, key=_numel)
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            return {
                "frozen": _numel(model) - trained,
                "trained": trained,
                "unit": _numel(unit),
                "unit_trained": sum(p.numel() for p in unit.parameters() if p.requires_grad),
                "root": _numel(model) - sum(map(_numel, units)),
                "units": len(units),
            }

        return self._once(("sizes", family, lora), compute)

    def frozen(self, family: str) -> dict:
        """Bytes of the frozen text encoders and VAE (bf16), each replicated on every GPU."""

        def compute():
            import diffusers

            if "frozen" in self.families[family]:
                return self.families[family]["frozen"]()
            f = self.families[family]
            with torch.device("meta"):
                vae = diffusers.AutoencoderKL.from_config(f["vae"])
            return {
                f"text_encoder{f'_{i + 1}' if i else ''}": ge.frozen_bytes(cls, config, torch.bfloat16)
                for i, (cls, config) in enumerate(f["text"])
            } | {"vae": _numel(vae) * BF16}

        return self._once(("frozen", family), compute)

    def step(self, family: str, model):
        from trainer.config.presets import PRESETS

        preset = PRESETS[self.families[family]["preset"]]
        if "step" in self.families[family]:
            return self.families[family]["step"](model, preset)
        if family == "qwen":
            return QwenStep(model, torch.bfloat16, QWEN_SAMPLE, ge.training(preset))
        tokens = preset.get("pretrained", {}).get("max_sequence_length") or 512
        return ge.Step(model, torch.bfloat16, preset["sample"], ge.training(preset), tokens)

    def padded(self, family: str, lora: bool):
        """The denoiser at full depth for a checkpointed step: the last block of each kind real, every other one a
        ``StandIn`` (fake tensors)."""
        counts, stand_ins = self.families[family]["checkpointed"]
        model, stand_in = self.model(family, counts, lora, self.fake), self.families[family].get("stand_in", StandIn)()
        with self.fake:
            stand_in.to_empty(device="cpu")
        stand_in.scale.register_post_accumulate_grad_hook(_drop_gradient)
        for name, where in stand_ins.items():
            blocks = list(getattr(model, name))
            for index in sorted(where, reverse=True):
                blocks[index:index] = [stand_in] * where[index]
            setattr(model, name, torch.nn.ModuleList(blocks))
        if sum(len(getattr(model, name)) for name in stand_ins) != sum(self.families[family]["layers"].values()):
            raise ValueError(f"{family}: the stand-ins do not make up the full depth")
        return model

    def activations(self, family: str, lora: bool, resolution, checkpointing: bool, kind: str = "train") -> dict:
        """Activation bytes at the peak of one ``kind`` step (gpu_estimate's run_step: "train" DDPO's, "forward_train"
        DiffusionNFT's), batch 1 and each further sample, at full depth. Checkpointed: measured on ``padded``'s model.
        Not: measured with one block of each kind and with two of one kind, extrapolated linearly per kind (each
        block keeps its own activations until its backward); its FLOPs too (``flops_batch1``, ``flops_per_sample``:
        not under checkpointing, whose stand-ins compute nothing)."""

        def run(model) -> list[tuple[int, int]]:
            step = self.step(family, model)
            runs = [ge.run_step(step, kind, n, resolution, self.fake, checkpointing=checkpointing) for n in (1, 2)]
            return [(r["by_category"]["activations"], r["flops"]) for r in runs]

        def compute():
            if checkpointing:
                full = run(self.padded(family, lora))
            else:
                layers = self.families[family]["layers"]
                base = dict.fromkeys(layers, 1)
                first, *more = [
                    run(self.model(family, {**base, **c}, lora, self.fake)) for c in [{}, *({k: 2} for k in layers)]
                ]
                full = [
                    tuple(
                        first[i][j] + sum((layers[k] - 1) * (m[i][j] - first[i][j]) for k, m in zip(layers, more))
                        for j in (0, 1)
                    )
                    for i in (0, 1)
                ]
            out = {"batch1": full[0][0], "per_sample": full[1][0] - full[0][0]}
            if not checkpointing:
                out |= {"flops_batch1": full[0][1], "flops_per_sample": full[1][1] - full[0][1]}
            return out

        return self._once(("activations", family, lora, resolution, checkpointing, kind), compute)
