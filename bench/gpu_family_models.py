"""The denoisers of the families added in 2026 that bench/gpu_families.py estimates: their published configs (each
with its source and the parameters it gives), the frozen modules, each recipe's step on fake tensors, and the
shard_models.Simulation entries (how, in bench/gpu_families.py's docstring)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bench import gpu_estimate as ge
from bench import shard_models as sm

BF16 = sm.BF16
ZIMAGE_TOKENS = 64  # a short prompt's real tokens in Qwen3's chat template (ZImagePipeline pads to multiples of 32)

# -- published configs (no weights needed) ----------------------------------------------------------------------
# huggingface.co/black-forest-labs/FLUX.2-klein-4B/blob/main/transformer/config.json as recalled (not downloaded):
# 5 double- and 20 single-stream blocks of 24 heads x 128, Qwen3-4B's layers 9, 18 and 27 side by side (3 x 2560),
# no guidance input. Gives 3.876e9 parameters ("4B"). FLUX.2-klein-base-4B: the same transformer.
FLUX2_KLEIN_4B = {
    "patch_size": 1,
    "in_channels": 128,
    "num_layers": 5,
    "num_single_layers": 20,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 7680,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32],
    "rope_theta": 2000,
    "guidance_embeds": False,
}
# ZImageTransformer2DModel's defaults, which are the published Tongyi-MAI/Z-Image(-Turbo) transformer/config.json's
# (as recalled, not downloaded): 30 layers
# (and 2 noise + 2 context refiner layers) of 30 heads x 128 (3840 wide), Qwen3-4B's 2560-wide states in. 6.155e9
# parameters ("6B"; the Z-Image report's 6.15B).
ZIMAGE_6B: dict = {}
# WanTransformer3DModel's defaults are Wan2.1-T2V-14B's (Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json, as
# recalled):
# 40 layers of 40 heads x 128, FFN 13824, UMT5's 4096 in; 14.288e9 parameters ("14B"). Each of Wan2.2-T2V-A14B's two
# experts is the same transformer.
WAN_14B = {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824, "num_layers": 40}
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json (as recalled): 30 layers of 12 heads x 128 (1536 wide),
# FFN 8960; 1.419e9 parameters (the name rounds down: "1.3B").
WAN21_1_3B = {"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "num_layers": 30}
# Qwen/Qwen3-4B config.json (as recalled; FLUX.2-klein-4B's text_encoder, Qwen3ForCausalLM; Z-Image's, Qwen3Model):
# 36 layers, 2560 wide, GQA 32/8 heads of 128, tied embeddings; 4.022e9 parameters.
QWEN3_4B = {
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}
# google/umt5-xxl's encoder (as recalled; Wan's text_encoder, UMT5EncoderModel): T5-XXL's shape with UMT5's 256384
# tokens; 5.681e9 parameters.
UMT5_XXL = {**ge.T5_XXL, "vocab_size": 256384}

# name: the denoiser's class, config, FSDP units and depth; its published size (the name's) and what the config gives
MODELS = {
    "flux2-klein-4b": dict(
        cls="Flux2Transformer2DModel",
        config=FLUX2_KLEIN_4B,
        units=("Flux2TransformerBlock", "Flux2SingleTransformerBlock"),
        layers={"num_layers": 5, "num_single_layers": 20},
        published=4.0e9,
    ),
    "zimage-6b": dict(
        cls="ZImageTransformer2DModel",
        config=ZIMAGE_6B,
        units=("ZImageTransformerBlock",),
        layers={"n_layers": 30},  # the 4 refiner blocks stay in the 1- and 2-layer models
        checkpointed=({"n_layers": 1}, {"layers": {0: 29}}),
        published=6.15e9,
    ),
    "wan21-1.3b": dict(
        cls="WanTransformer3DModel",
        config=WAN21_1_3B,
        units=("WanTransformerBlock",),
        layers={"num_layers": 30},
        checkpointed=({"num_layers": 1}, {"blocks": {0: 29}}),
        published=1.3e9,
    ),
    "wan-14b": dict(
        cls="WanTransformer3DModel",
        config=WAN_14B,
        units=("WanTransformerBlock",),
        layers={"num_layers": 40},
        checkpointed=({"num_layers": 1}, {"blocks": {0: 39}}),
        published=14.0e9,
    ),
    "qwen-image-20b": dict(
        cls=sm.FAMILIES["qwen"]["cls"],
        config=sm.QWEN_IMAGE_TRANSFORMER,
        units=sm.FAMILIES["qwen"]["units"],
        layers=sm.FAMILIES["qwen"]["layers"],
        checkpointed=sm.FAMILIES["qwen"]["checkpointed"],
        published=20.0e9,
    ),
}


class StandIn(sm.StandIn):
    """shard_models.StandIn for blocks that return their hidden states alone (Wan's, Z-Image's)."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.nn.functional.gelu(hidden_states) * self.scale


def params(model: str) -> int:
    """The parameters of ``model``'s published config (meta tensors, no adapters)."""
    import diffusers

    with torch.device("meta"):
        m = getattr(diffusers, MODELS[model]["cls"]).from_config(MODELS[model]["config"])
    return sum(p.numel() for p in m.parameters())


# -- the frozen modules ----------------------------------------------------------------------------------------
def _frozen(text: tuple[str, dict] | None, vae: str, vae_config: dict | None = None, expert: str | None = None):
    """A function giving the bytes (bf16) of a family's frozen modules: its text encoder, its VAE and, for
    Wan2.2-A14B, the expert not trained."""

    def compute() -> dict:
        import diffusers
        import transformers

        out = {}
        with torch.device("meta"):
            if text is not None:
                cls, config = text
                config_cls = transformers.UMT5Config if cls.startswith("UMT5") else transformers.Qwen3Config
                out["text_encoder"] = sm._numel(getattr(transformers, cls)(config_cls(**config))) * BF16
            out["vae"] = sm._numel(getattr(diffusers, vae).from_config(vae_config or {})) * BF16
        if expert is not None:
            out["transformer_2"] = params(expert) * BF16
        return out

    return compute


# -- the steps ------------------------------------------------------------------------------------------------
def zimage_predict(model, latents, timesteps, cond, negative, guidance_scale):
    """trainer.families.zimage.ZImage.predict with every caption token real (no boolean unpadding): per-image
    latents, timestep 1 - sigma, positives and negatives in one call, the output negated."""
    n = latents.shape[0]
    timesteps = timesteps.expand(n) if timesteps.ndim == 0 else timesteps
    captions = list(cond["prompt_embeds"].unbind(0))
    guided = negative is not None and guidance_scale != 1
    if guided:
        captions += list(negative["prompt_embeds"].expand(n, -1, -1).unbind(0))
        latents, timesteps = latents.repeat(2, 1, 1, 1), timesteps.repeat(2)
    out = model(list(latents.unsqueeze(2).unbind(0)), (1000 - timesteps) / 1000, captions, return_dict=False)[0]
    out = torch.stack([o.float() for o in out]).squeeze(2)
    if guided:
        out = out[:n] + (guidance_scale - 1) * (out[:n] - out[n:])
    return -out


def _flux2_predict(model, latents, timesteps, cond, negative, guidance_scale):
    from trainer.families.flux2 import Flux2

    return Flux2.predict(SimpleNamespace(distilled=False), model, latents, timesteps, cond, negative, guidance_scale)


def _wan_predict(model, latents, timesteps, cond, negative, guidance_scale):
    from trainer.families.wan import guided_twice

    return guided_twice(model, latents, timesteps, cond, negative, guidance_scale)


class FamilyStep(ge.Step):
    """gpu_estimate's step for FLUX.2-klein, Z-Image and Wan: the family's predict, flow matching at shift 3 (the
    memory and FLOPs do not depend on the shift), ``tokens`` prompt tokens of ``width``; ``resolution`` an image's
    side or (height, width, frames) for video latents (N, C, (F - 1) / 4 + 1, H / 8, W / 8)."""

    def __init__(self, model, preset: dict, predict, channels: int, tokens: int, width: int):
        from diffusers import FlowMatchEulerDiscreteScheduler

        from trainer.families.flow import FlowMatching

        self.model, self.dtype, self.sample, self.train = model, torch.bfloat16, preset["sample"], ge.training(preset)
        self.flow, self.flux, self.latent_channels, self.family = True, False, channels, self
        self.predict, self.tokens, self.width = predict, tokens, width
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        self.scheduler.set_timesteps(self.sample["num_steps"])
        self.schedule = FlowMatching(self.scheduler)

    def inputs(self, n: int, resolution) -> dict:
        height, width, frames = resolution if isinstance(resolution, tuple) else (resolution, resolution, None)
        grid = (height // 8, width // 8)
        shape = (n, self.latent_channels, *(() if frames is None else ((frames - 1) // 4 + 1,)), *grid)
        cond = {"prompt_embeds": torch.randn(n, self.tokens, self.width, dtype=self.dtype)}
        index, latents = self.sample["num_steps"] // 2, torch.randn(*shape)
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


def _step(predict, channels: int, tokens: int, width: int):
    return lambda model, preset: FamilyStep(model, preset, predict, channels, tokens, width)


def _qwen_step(model, preset: dict):
    return sm.QwenStep(model, torch.bfloat16, preset["sample"], ge.training(preset))


_FLUX2 = dict(
    model="flux2-klein-4b",
    step=_step(_flux2_predict, 32, 512, 3 * QWEN3_4B["hidden_size"]),
    frozen=_frozen(("Qwen3ForCausalLM", QWEN3_4B), "AutoencoderKLFlux2"),
)
_QWEN = dict(model="qwen-image-20b", step=_qwen_step, frozen=sm.qwen_frozen)
_WAN_TEXT = ("UMT5EncoderModel", UMT5_XXL)
_WAN21 = dict(
    model="wan21-1.3b", step=_step(_wan_predict, 16, 512, 4096), frozen=_frozen(_WAN_TEXT, "AutoencoderKLWan")
)
# the recipes: the family each runs (a shard_models.FAMILIES entry, keyed by the preset whose LoRA applies)
RECIPES = {
    "flux2-klein-pickscore-grpo": _FLUX2,
    "flux2-klein-pickscore-nft": _FLUX2,
    "qwenimage-pickscore-grpo": _QWEN,
    "qwenimage-pickscore-nft": _QWEN,
    "wan21-t2v-ocr-grpo": _WAN21,
    "wan21-t2v-pickscore-nft": _WAN21,
    "wan22-t2v-pickscore-grpo": dict(
        model="wan-14b",
        step=_step(_wan_predict, 16, 512, 4096),
        frozen=_frozen(_WAN_TEXT, "AutoencoderKLWan", expert="wan-14b"),
    ),
    "zimage-pickscore-grpo": dict(
        model="zimage-6b",
        step=_step(zimage_predict, 16, ZIMAGE_TOKENS, QWEN3_4B["hidden_size"]),
        frozen=_frozen(("Qwen3Model", QWEN3_4B), "AutoencoderKL", ge.FLUX_VAE),
    ),
}


def families() -> dict:
    """shard_models.Simulation's family entries, one per recipe."""
    return {
        name: {**MODELS[r["model"]], "preset": name, "step": r["step"], "frozen": r["frozen"]}
        | ({} if r["model"] == "qwen-image-20b" else {"stand_in": StandIn})
        for name, r in RECIPES.items()
    }
