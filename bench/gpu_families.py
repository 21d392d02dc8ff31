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

import torch

from bench import gpu_estimate as ge
from bench import shard_estimate as se
from bench import shard_models as sm
from bench.gpu_family_models import BF16, MODELS, RECIPES, families


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
    out["fewest_80gb_gpus_fsdp"] = se.smallest(lambda n: se.need(sim, r, n, "fsdp")["total"], 64)
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
        "weights_gb": {
            "denoiser": gb(count * BF16 + sizes["trained"] * se.FP32),
            **{k: gb(v) for k, v in frozen.items()},
        },
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
        "fewest 80 GB GPUs (fsdp) | TFLOP a sample: train step (per frame) / rollout |",
        "|---" * 10 + "|",
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
            f"{e['fewest_80gb_gpus_fsdp'] or 'none'} | {flops} / {e['rollout_tflop_per_sample']} |"
        )
    lines += [
        "",
        f"| recipe, with gradient checkpointing (off in the preset) | activations GB | peak GB, 1 GPU | peak GB, "
        f"fsdp {gpus} | largest batch on 80 GB: 1 GPU / fsdp {gpus} | fewest 80 GB GPUs (fsdp) |",
        "|---" * 6 + "|",
    ]
    for name, e in rows.items():
        if "with_checkpointing" in e:
            c = e["with_checkpointing"]
            p1, p8 = c["per_gpu_gb"]["unsharded"]["total"], c["per_gpu_gb"][f"fsdp{gpus}"]["total"]
            fits = {k: "" if v else " (over)" for k, v in c["fits_80gb"].items()}
            lines.append(
                f"| {name} | {c['activations_gb']['at_batch']} | {p1}{fits['unsharded']} | "
                f"{p8}{fits[f'fsdp{gpus}']} | {c['largest_batch_80gb']['unsharded']} / "
                f"{c['largest_batch_80gb'][f'fsdp{gpus}']} | {c['fewest_80gb_gpus_fsdp'] or 'none'} |"
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
