"""GPU memory and FLOPs of the recipes of the families added in 2026 (trainer/config/family_presets.py: FLUX.2-klein,
Qwen-Image, Wan2.1/2.2 T2V, Z-Image), estimated without a GPU: bench/gpu_estimate.py's step on fake tensors, bench/
shard_estimate.py's per-GPU arithmetic unsharded (one process) and with run.sharding fsdp on 8 GPUs.

    python -m bench.gpu_families [--recipes wan21-t2v-ocr-grpo,...] [--out FILE] [--markdown]

ESTIMATES, NOT MEASUREMENTS. How:
- The denoisers are built from their published configs (below, each with its source and the parameters it gives)
  on fake tensors, with the preset's LoRA. A full-depth fake step of a 4-20B model is slow in Python, so the step
  runs as bench/shard_models.py runs Qwen-Image's: with one and with two blocks of each kind, extrapolated linearly
  in depth (activations and FLOPs; Qwen-Image's gradient-checkpointed step at full depth with stand-in blocks).
- The step is the preset's: DDPO's (the flow SDE's log-prob with the preset's guidance: two passes where the
  family's predict guides; FLUX.2-klein's distilled GRPO recipe, guidance 1, one) or DiffusionNFT's (three
  conditional forwards, one with gradient), each through the family's own predict (trainer/families) where it runs on
  fake tensors (Wan, FLUX.2-klein, Qwen-Image's shard_models.QwenStep); Z-Image's in ``zimage_predict`` (its
  captions are unpadded by a boolean mask, a data-dependent shape fake tensors cannot take).
- Prompt tokens: FLUX.2-klein and Wan pad to 512 (their pipelines'), Qwen-Image 256 (shard_models.QWEN_TOKENS),
  Z-Image's real tokens only, taken as ZIMAGE_TOKENS.
- Per GPU: shard_estimate.need (its docstring's assumptions: frozen text encoders and VAE replicated in bf16, the
  base sharded in bf16, LoRA's adapters, gradients and AdamW states in fp32; at N = 1 it also counts the gathered
  root and two blocks, as docs/scale.md's N=1 column). Wan2.2-A14B keeps its other expert (frozen, bf16) on every GPU,
  as the trainer's frozen_modules. Batch: train.batch_size x timesteps per forward; the largest batch is the train
  forward's alone (the sampling batch is not sized here).
- FLOPs per sample: one training step at batch 1 (tflop_per_sample; gradient checkpointing's recomputation not
  included) and one sampling step (sampling_tflop_per_step, x sample.num_steps for the rollout); for Wan also per
  video frame.
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

from bench import gpu_estimate as ge
from bench import shard_estimate as se
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
# ZImageTransformer2DModel's defaults, the published Tongyi-MAI/Z-Image(-Turbo) transformer/config.json: 30 layers
# (and 2 noise + 2 context refiner layers) of 30 heads x 128 (3840 wide), Qwen3-4B's 2560-wide states in. 6.155e9
# parameters ("6B"; the Z-Image report's 6.15B).
ZIMAGE_6B: dict = {}
# WanTransformer3DModel's defaults are Wan2.1-T2V-14B's (Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json):
# 40 layers of 40 heads x 128, FFN 13824, UMT5's 4096 in; 14.288e9 parameters ("14B"). Each of Wan2.2-T2V-A14B's two
# experts is the same transformer.
WAN_14B = {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824, "num_layers": 40}
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json: 30 layers of 12 heads x 128 (1536 wide), FFN 8960;
# 1.419e9 parameters (the name rounds down: "1.3B").
WAN21_1_3B = {"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "num_layers": 30}
# Qwen/Qwen3-4B config.json (FLUX.2-klein-4B's text_encoder, Qwen3ForCausalLM; Z-Image's, Qwen3Model): 36 layers,
# 2560 wide, GQA 32/8 heads of 128, tied embeddings; 4.022e9 parameters.
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
# google/umt5-xxl's encoder (Wan's text_encoder, UMT5EncoderModel): T5-XXL's shape with UMT5's 256384 tokens;
# 5.681e9 parameters.
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


# -- the rows ---------------------------------------------------------------------------------------------------
def recipe(name: str) -> dict:
    """shard_estimate's recipe of a preset: its resolution ((height, width, frames) for video), the train forward's
    batch (train.batch_size x timesteps per forward), gradient checkpointing and step kind."""
    from trainer.config import Config
    from trainer.plan import BatchPlan

    cfg = Config(preset=name)
    s = cfg.sample
    if not cfg.train.lora:
        raise ValueError(f"{name}: a full finetune; the rows here are LoRA's")
    return dict(
        family=name,
        lora=True,
        resolution=(s.resolution, s.width or s.resolution, s.num_frames) if s.num_frames else s.resolution,
        batch=cfg.train.batch_size * max(g.stop - g.start for g in BatchPlan.step_groups_of(cfg)),
        checkpointing=cfg.train.gradient_checkpointing,
        kind="forward_train" if cfg.algorithm in ("nft", "awm") else "train",
        frames=s.num_frames,
        num_steps=s.num_steps,
        sharding=cfg.run.sharding,
    )


def gb(nbytes: float) -> float:
    return round(nbytes / ge.GB, 2)


def peaks(sim: sm.Simulation, r: dict, gpus: int = 8) -> dict:
    """Per-GPU need of recipe ``r`` unsharded and with fsdp on ``gpus`` (shard_estimate.need), whether it fits an
    80 GB card, and the largest train batch that would."""
    acts = sim.activations(r["family"], True, r["resolution"], r["checkpointing"], r["kind"])
    out = {"activations_gb": {"batch1": gb(acts["batch1"]), "per_sample": gb(acts["per_sample"])}}
    out["activations_gb"]["at_batch"] = gb(acts["batch1"] + (r["batch"] - 1) * acts["per_sample"])
    out |= {"per_gpu_gb": {}, "fits_80gb": {}, "largest_batch_80gb": {}}
    for key, n in (("unsharded", 1), (f"fsdp{gpus}", gpus)):
        need = se.need(sim, r, n, "fsdp")
        out["per_gpu_gb"][key] = {k: gb(v) for k, v in need.items()}
        out["fits_80gb"][key] = se.need_fits(need["total"])
        batch1 = se.need(sim, {**r, "batch": 1}, n, "fsdp")["total"]
        out["largest_batch_80gb"][key] = ge.largest_batch(batch1, acts["per_sample"], se.CARD_GB)
    return out


def row(sim: sm.Simulation, name: str, gpus: int = 8) -> dict:
    """One recipe's figures: weights, activations, per-GPU peak unsharded and with fsdp on ``gpus``, the largest
    train batch fitting 80 GB each way (and the same with gradient checkpointing where the preset has it off), FLOPs
    per sample (and per video frame)."""
    r, model = recipe(name), RECIPES[name]["model"]
    sizes = sim.sizes(name, True)
    plain = sim.activations(name, True, r["resolution"], False, r["kind"])
    sampling = sim.activations(name, True, r["resolution"], False, "sampling")
    frozen = sim.frozen(name)
    count = sizes["frozen"]
    out = {
        "model": model,
        "denoiser": MODELS[model]["cls"],
        "params": count,
        "published_params": MODELS[model]["published"],
        "lora_params": sizes["trained"],
        "resolution": r["resolution"],
        "batch": r["batch"],
        "step": r["kind"],
        "checkpointing": r["checkpointing"],
        "preset_sharding": r["sharding"],
        "weights_gb": {"denoiser": gb(count * BF16 + sizes["trained"] * se.FP32), **{k: gb(v) for k, v in frozen.items()}},
        **peaks(sim, r, gpus),
        "tflop_per_sample": round(plain["flops_batch1"] / 1e12, 3),
        "sampling_tflop_per_step": round(sampling["flops_batch1"] / 1e12, 3),
        "rollout_tflop_per_sample": round(r["num_steps"] * sampling["flops_batch1"] / 1e12, 2),
    }
    if not r["checkpointing"] and "checkpointed" in MODELS[model]:
        out["with_checkpointing"] = peaks(sim, {**r, "checkpointing": True}, gpus)
    if r["frames"]:
        out["frames"] = r["frames"]
        out["tflop_per_frame"] = round(plain["flops_batch1"] / r["frames"] / 1e12, 4)
        out["rollout_tflop_per_frame"] = round(r["num_steps"] * sampling["flops_batch1"] / r["frames"] / 1e12, 3)
    return out


def markdown(rows: dict, gpus: int = 8) -> str:
    """docs/scale.md's table of the rows."""
    lines = [
        f"| recipe | denoiser (params) | px, frames; train batch; step; AC | weights GB: denoiser + frozen | "
        f"activations GB | peak GB, 1 GPU | peak GB, fsdp {gpus} | largest batch on 80 GB: 1 GPU / fsdp {gpus} | "
        "TFLOP a sample: train step (per frame) / rollout |",
        "|---" * 9 + "|",
    ]
    for name, e in rows.items():
        res = e["resolution"]
        px = f"{res[0]}x{res[1]}, {res[2]}" if isinstance(res, (list, tuple)) else f"{res}"
        w = e["weights_gb"]
        frozen = " + ".join(f"{v}" for k, v in w.items() if k != "denoiser")
        p1, p8 = e["per_gpu_gb"]["unsharded"]["total"], e["per_gpu_gb"][f"fsdp{gpus}"]["total"]
        fits = {k: "" if v else " (over)" for k, v in e["fits_80gb"].items()}
        flops = f"{e['tflop_per_sample']}" + (f" ({e['tflop_per_frame']})" if "tflop_per_frame" in e else "")
        lines.append(
            f"| {name} | {e['model']} ({e['params'] / 1e9:.2f}B, LoRA {e['lora_params'] / 1e6:.0f}M) | {px}; "
            f"{e['batch']}; {e['step']}; {'on' if e['checkpointing'] else 'off'} | {w['denoiser']} + {frozen} | "
            f"{e['activations_gb']['at_batch']} | {p1}{fits['unsharded']} | {p8}{fits[f'fsdp{gpus}']} | "
            f"{e['largest_batch_80gb']['unsharded']} / {e['largest_batch_80gb'][f'fsdp{gpus}']} | "
            f"{flops} / {e['rollout_tflop_per_sample']} |"
        )
    lines += [
        "",
        f"| recipe, with gradient checkpointing (off in the preset) | activations GB | peak GB, 1 GPU | peak GB, "
        f"fsdp {gpus} | largest batch on 80 GB: 1 GPU / fsdp {gpus} |",
        "|---" * 5 + "|",
    ]
    for name, e in rows.items():
        if "with_checkpointing" in e:
            c = e["with_checkpointing"]
            p1, p8 = c["per_gpu_gb"]["unsharded"]["total"], c["per_gpu_gb"][f"fsdp{gpus}"]["total"]
            fits = {k: "" if v else " (over)" for k, v in c["fits_80gb"].items()}
            lines.append(
                f"| {name} | {c['activations_gb']['at_batch']} | {p1}{fits['unsharded']} | "
                f"{p8}{fits[f'fsdp{gpus}']} | {c['largest_batch_80gb']['unsharded']} / "
                f"{c['largest_batch_80gb'][f'fsdp{gpus}']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated, of: " + ", ".join(RECIPES))
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    parser.add_argument("--markdown", action="store_true", help="print docs/scale.md's table instead of the JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # fake tensors do no arithmetic
    start = time.perf_counter()
    sim = sm.Simulation(FakeTensorMode(allow_non_fake_inputs=True), families())
    report = {
        "benchmark": "gpu_families",
        "estimates": "fake tensors and shard_estimate's arithmetic, not measured on a GPU",
        "units": "GB = 1e9 bytes; tflop = 1e12 FLOPs (a multiply-add is 2)",
        "card_gb": se.CARD_GB,
        "margin": {"context_gb": ge.CONTEXT_GB, "fragmentation": ge.FRAGMENTATION},
        "method": __doc__.split("\n\n", 2)[2].strip(),
        "recipes": {name: row(sim, name) for name in args.recipes.split(",")},
    }
    report["seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(report, indent=1)
    print(markdown(report["recipes"]) if args.markdown else text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
