"""Per-GPU memory and communication of a sharded training step (run.sharding fsdp|hybrid) on 1 to 32 GPUs,
estimated without a GPU, for the recipes the big families need sharding for.

    python -m bench.shard_estimate [--recipes flux-full,qwen-lora] [--out FILE] [--markdown]

The recipes and the anchors' setups are in bench/shard_setups.py; the models, their sizes and the measured
activations in bench/shard_models.py; the tables of docs/scale.md are ``--markdown``'s output.

Estimates, not measurements on a GPU. What is assumed, as trainer/sharding.py runs torch's FSDP2 ``fully_shard``:
- Sharded (dim 0, over the shard group: all N GPUs for fsdp, the 8 of a node for hybrid): every parameter of
  the trained denoiser, one unit per transformer block (FLUX's double- and single-stream blocks, the MMDiT's
  joint blocks, QwenImageTransformerBlock) and the root for the rest. Full finetune: fp32 master weights,
  fp32 gradients (reduce_dtype fp32) and AdamW's two fp32 moments, 16 bytes a parameter over N. LoRA: the frozen
  base in bf16 (2 bytes, sharded too: fully_shard shards every parameter), the adapters 16 bytes as above.
- Gathered (unsharded, bf16 via MixedPrecisionPolicy(param_dtype=bf16)): the root for the whole step (its
  forward and backward span the blocks'), the current unit and the prefetched next one, both taken as the
  largest unit; in backward also the current unit's unsharded gradients of its trained parameters, bf16 and
  their fp32 copy for the reduce-scatter (6 bytes a trained parameter of the unit).
- Gradient sync: LoRA defers the reduce-scatter to the optimizer step's last micro-batch (trainer/sharding.py
  set_gradient_sync), so FSDP2 keeps every adapter's unsharded gradient in fp32 meanwhile (4 bytes a trained
  parameter, counted as accumulated_grads). Full finetune reduce-scatters every micro-batch: deferring would keep
  the whole model's unsharded fp32 gradients on every GPU whatever N (deferred_sync_extra_gb, 32 to 82 GB here).
- Replicated on every GPU: the frozen text encoders and the VAE, in bf16 (trainer.families.models.load_family
  keeps them all on the GPU; Qwen-Image's Qwen2.5-VL-7B whole, vision tower and lm_head included, as loaded).
  No reference copy (KL to the base is LoRA-only here: the adapters disabled) and EMA off (on: 4 bytes a
  trained parameter over N more).
- Activations: gpu_estimate's measured step (fake tensors under CUDA autocast's dtype policy: its Step's
  predict, the flow SDE's log-prob, PPO-clip, backward, clipping, AdamW) at the recipe's resolution, batch 1 and
  2, on denoisers built from the published configs, each trained gradient taken out of the count once
  accumulated (a full finetune's is reduce-scattered and freed; LoRA's joins accumulated_grads). LoRA: the
  adapters as gpu_estimate adds them; full finetune: every weight trained in bf16 (the gathered compute copy).
  Without gradient checkpointing: one block of each kind, then two of one kind, extrapolated linearly per kind
  (every block keeps its own activations until its backward). With it: the full depth, the last block of each
  kind real and the others stand-ins that keep their inputs as a checkpointed block does (shard_models.StandIn).
  Both checked against the full-depth step (docs/scale.md). Batch b costs the batch-1 figure plus (b - 1) x the
  per-sample one; classifier-free guidance doubles the batch through the denoiser where the recipe guides (SD3.5,
  Qwen-Image; FLUX.1-dev's guidance is an input). Qwen-Image, which gpu_estimate does not build, runs as
  diffusers' QwenImageTransformer2DModel (its defaults are the published Qwen/Qwen-Image config) with 256 text
  tokens, no padding mask, latents packed 2x2, through the same step (shard_models.QwenStep).
- need = sum of the above; a card of C GB fits it when (1 + fragmentation) x need + context <= C (gpu_estimate's
  CONTEXT_GB and FRAGMENTATION). N = 1 uses the same arithmetic with no communication (the trainer leaves the
  denoiser whole there). cpu_offload: the sharded state lives in CPU memory, the rest stays.
- Communication per GPU, ring collectives (each GPU sends and receives (S - 1) / S of the collective's bytes,
  S the shard group): all-gather of all sharded parameters in bf16 in forward and again in backward
  (reshard_after_forward true, the trainer's default), reduce-scatter of the trained parameters' gradients in
  fp32; hybrid adds an all-reduce of each GPU's gradient shard across the N / 8 replicas (2 (R - 1) / R of it).
  Per optimizer step: micro-batches (forward + backward of one train batch) x the all-gathers, and the
  reduce-scatter once (LoRA, deferred) or every micro-batch (full finetune).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench import gpu_estimate as ge
from bench.shard_models import BF16, Simulation
from bench.shard_setups import PUBLISHED, RECIPES

GPU_COUNTS, PER_NODE, CARD_GB = (1, 2, 4, 8, 16, 32), 8, 80.0
FP32, ADAM = 4, 8  # bytes a parameter: master weight or gradient; AdamW's two moments (BF16: the compute copy)


# -- the arithmetic -----------------------------------------------------------------------------------------------
def shard_group(n: int, strategy: str) -> int:
    return n if strategy == "fsdp" else min(n, PER_NODE)


def per_gpu(sizes: dict, n: int, strategy: str, activations: float, frozen: float, lora: bool) -> dict:
    """Bytes one GPU holds at the step's peak. ``sizes``: parameter counts, frozen and trained in the denoiser,
    of its largest unit (all, trained) and of the root (outside the units)."""
    s = shard_group(n, strategy)
    out = {
        "sharded_weights": (sizes["frozen"] * BF16 + sizes["trained"] * FP32) / s,
        "sharded_grads": sizes["trained"] * FP32 / s,
        "sharded_optimizer": sizes["trained"] * ADAM / s,
        "gathered": (sizes["root"] + 2 * sizes["unit"]) * BF16 + sizes["unit_trained"] * (BF16 + FP32),
        "frozen_replicated": frozen,
        "activations": activations,
        "accumulated_grads": sizes["trained"] * FP32 if lora else 0.0,
    }
    return out | {"total": sum(out.values())}


def communication(sizes: dict, n: int, strategy: str, micro_batches: int, lora: bool, reshard: bool = True) -> dict:
    """Bytes each GPU sends (and receives) in ring collectives: per micro-batch and per optimizer step."""
    s, params = shard_group(n, strategy), sizes["frozen"] + sizes["trained"]
    replicas = n // s
    all_gather = (s - 1) / s * params * BF16 * (2 if reshard else 1)
    reduce_scatter = (s - 1) / s * sizes["trained"] * FP32
    all_reduce = 2 * (replicas - 1) / replicas * sizes["trained"] * FP32 / s
    syncs = 1 if lora else micro_batches
    return {
        "all_gather_per_micro_batch": all_gather,
        "reduce_scatter_per_sync": reduce_scatter,
        "all_reduce_per_sync": all_reduce,
        "syncs_per_step": syncs,
        "per_optimizer_step": micro_batches * all_gather + syncs * (reduce_scatter + all_reduce),
        "across_nodes_per_optimizer_step": syncs * all_reduce,  # hybrid's; fsdp's rings cross nodes with all of it
    }


def need_fits(need_bytes: float, card_gb: float = CARD_GB) -> bool:
    return (1 + ge.FRAGMENTATION) * need_bytes / ge.GB + ge.CONTEXT_GB <= card_gb


def smallest(need, limit: int = 1024) -> int | None:
    """The fewest GPUs n (1 to ``limit``) with need(n) fitting an 80 GB card; None if none does."""
    return next((n for n in range(1, limit + 1) if need_fits(need(n))), None)


def need(sim: Simulation, recipe: dict, n: int, strategy: str, replicated: bool = True, offload: bool = False) -> dict:
    """Per-GPU bytes of ``recipe`` on ``n`` GPUs. ``replicated`` false: no text encoder on the GPU (precomputed
    embeddings); ``offload``: the sharded state in CPU memory (run.cpu_offload)."""
    acts = sim.activations(
        recipe["family"], recipe["lora"], recipe["resolution"], recipe["checkpointing"], recipe.get("kind", "train")
    )
    frozen = sum(v for k, v in sim.frozen(recipe["family"]).items() if replicated or not k.startswith("text"))
    activations = acts["batch1"] + (recipe["batch"] - 1) * acts["per_sample"]
    row = per_gpu(sim.sizes(recipe["family"], recipe["lora"]), n, strategy, activations, frozen, recipe["lora"])
    if offload:
        row = {k: 0.0 if k.startswith("sharded") else v for k, v in row.items() if k != "total"}
        row["total"] = sum(row.values())
    return row


def gb(nbytes: float) -> float:
    return round(nbytes / ge.GB, 2)


def compare(sim: Simulation, anchor: dict) -> dict:
    """One anchor's setup beside our estimate of it: does our need fit their cards (or match their figure)?"""
    row = {k: anchor[k] for k in ("project", "runs", "gpus", "card_gb")}
    if anchor["recipe"] is None:
        return row | {"estimate": None, "agrees": "not estimated: " + anchor["why"]}
    recipe = {**RECIPES[anchor["recipe"]], **anchor.get("variant", {})}
    strategy = anchor["strategy"]
    n = 1 if strategy == "none" else anchor["gpus"]
    total = need(
        sim,
        recipe,
        n,
        "fsdp" if strategy == "none" else strategy,
        anchor.get("replicated", True),
        anchor.get("offload", False),
    )["total"]
    parts = [anchor["recipe"], f"{recipe['resolution']} px", f"batch {recipe['batch']}", strategy, f"N={n}"]
    parts += ["no text encoder"] * (not anchor.get("replicated", True)) + ["cpu offload"] * anchor.get("offload", False)
    fits = need_fits(total, anchor["card_gb"])
    if "claim_gb" in anchor:
        close = 0.75 <= total / ge.GB / anchor["claim_gb"] <= 1.33
        agrees = f"{'yes' if close else 'no'}: {gb(total)} GB against their ~{anchor['claim_gb']} GB"
    else:
        agrees = f"yes: fits {anchor['card_gb']} GB" if fits else f"no: over {anchor['card_gb']} GB"
    return row | {"estimate": ", ".join(parts), "need_gb": gb(total), "fits": fits, "agrees": agrees}


def estimate(sim: Simulation, key: str) -> dict:
    """One recipe: parameters, frozen parts, activations, per-GPU need and communication by N, the fewest GPUs."""
    r = RECIPES[key]
    sizes = sim.sizes(r["family"], r["lora"])
    strategies = {"fsdp": GPU_COUNTS, "hybrid": [n for n in GPU_COUNTS if n > PER_NODE]}
    activations = {}
    for name, checkpointing in (("plain", False), ("checkpointed", True)):
        a = sim.activations(r["family"], r["lora"], r["resolution"], checkpointing)
        at_batch = a["batch1"] + (r["batch"] - 1) * a["per_sample"]
        activations[name] = {"batch1": gb(a["batch1"]), "per_sample": gb(a["per_sample"]), "at_batch": gb(at_batch)}
    comm = {
        s: {str(n): communication(sizes, n, s, r["micro_batches"], r["lora"]) for n in ns if n > 1}
        for s, ns in strategies.items()
    }
    return {
        **{k: r[k] for k in ("source", "resolution", "batch", "checkpointing", "micro_batches")},
        "params": {k: sizes[k] for k in ("frozen", "trained", "units")},
        "largest_unit_gb": gb(sizes["unit"] * BF16),
        "root_gb": gb(sizes["root"] * BF16),
        "frozen_replicated_gb": {k: gb(v) for k, v in sim.frozen(r["family"]).items()},
        "activations_gb": activations,
        "per_gpu_gb": {
            s: {str(n): {k: gb(v) for k, v in need(sim, r, n, s).items()} for n in ns} for s, ns in strategies.items()
        },
        "communication_gb": {
            s: {n: {k: v if k == "syncs_per_step" else gb(v) for k, v in row.items()} for n, row in rows.items()}
            for s, rows in comm.items()
        },
        "deferred_sync_extra_gb": 0.0 if r["lora"] else gb(sizes["trained"] * FP32),
        "fewest_80gb_gpus": {s: smallest(lambda n, s=s: need(sim, r, n, s)["total"]) for s in strategies},
        "fits_80gb_with_cpu_offload": need_fits(need(sim, r, 2, "fsdp", offload=True)["total"]),
    }


def markdown(report: dict) -> str:
    """docs/scale.md's tables from the report."""
    recipes, big = report["recipes"], [str(n) for n in GPU_COUNTS]
    lines = [
        "| recipe | trained / all params | px, batch, AC | " + " | ".join(f"N={n}" for n in big) + " | fewest 80 GB |",
        "|---" * (len(big) + 4) + "|",
    ]
    for key, e in recipes.items():
        fsdp, hybrid = e["per_gpu_gb"]["fsdp"], e["per_gpu_gb"]["hybrid"]
        cells = [f"{fsdp[n]['total']}" + (f" [{hybrid[n]['total']}]" if n in hybrid else "") for n in big]
        fewest = e["fewest_80gb_gpus"]
        params = e["params"]["trained"] / 1e9, (e["params"]["trained"] + e["params"]["frozen"]) / 1e9
        run = f"{e['resolution']}, {e['batch']}, {'on' if e['checkpointing'] else 'off'}"
        lines.append(
            f"| {key} | {params[0]:.2f}B / {params[1]:.2f}B | {run} | "
            + " | ".join(cells)
            + f" | {fewest['fsdp'] or 'none'} (hybrid: {fewest['hybrid'] or 'none'}) |"
        )
    lines += [
        "",
        "| recipe (N=8, fsdp) | sharded weights | grads | optimizer | gathered units + root | frozen "
        "replicated | activations (per sample: plain / AC) | accumulated LoRA grads | total |",
        "|---" * 9 + "|",
    ]
    for key, e in recipes.items():
        row, a = e["per_gpu_gb"]["fsdp"]["8"], e["activations_gb"]
        per = f"{row['activations']} ({a['plain']['per_sample']} / {a['checkpointed']['per_sample']})"
        cells = [
            row[k] for k in ("sharded_weights", "sharded_grads", "sharded_optimizer", "gathered", "frozen_replicated")
        ] + [per, row["accumulated_grads"], row["total"]]
        lines.append(f"| {key} | " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        "| recipe | micro-batches (syncs) per step | all-gather per micro-batch, N=8 / 32 | reduce-scatter "
        "per sync, N=8 / 32 | per optimizer step, N=8 / 32 / 32 hybrid (of it across nodes) |",
        "|---" * 5 + "|",
    ]
    for key, e in recipes.items():
        c, h = e["communication_gb"]["fsdp"], e["communication_gb"]["hybrid"]["32"]
        lines.append(
            f"| {key} | {e['micro_batches']} ({c['8']['syncs_per_step']}) | "
            f"{c['8']['all_gather_per_micro_batch']} / {c['32']['all_gather_per_micro_batch']} | "
            f"{c['8']['reduce_scatter_per_sync']} / {c['32']['reduce_scatter_per_sync']} | "
            f"{c['8']['per_optimizer_step']} / {c['32']['per_optimizer_step']} / {h['per_optimizer_step']} "
            f"({h['across_nodes_per_optimizer_step']}) |"
        )
    lines += ["", "| project | what they run | GPUs | our estimate of it | need GB | agrees |", "|---" * 6 + "|"]
    for a in report["anchors"]:
        lines.append(
            f"| {a['project']} | {a['runs']} | {a['gpus']} x {a['card_gb']} GB | {a['estimate'] or '-'} | "
            f"{a.get('need_gb', '-')} | {a['agrees']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated, of: " + ", ".join(RECIPES))
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    parser.add_argument("--markdown", action="store_true", help="print docs/scale.md's tables instead of the JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # fake tensors do no arithmetic
    start, sim = time.perf_counter(), Simulation(FakeTensorMode(allow_non_fake_inputs=True))
    keys = args.recipes.split(",")
    report = {
        "benchmark": "shard_estimate",
        "estimates": "simulated on fake tensors and by arithmetic, not measured on a GPU",
        "units": "GB = 1e9 bytes; communication: bytes each GPU sends (and receives) in ring collectives",
        "card_gb": CARD_GB,
        "margin": {"context_gb": ge.CONTEXT_GB, "fragmentation": ge.FRAGMENTATION},
        "gpus_per_node": PER_NODE,
        "assumptions": __doc__.split("\n\n", 2)[2].strip(),
        "recipes": {key: estimate(sim, key) for key in keys},
    }
    report["anchors"] = [compare(sim, a) for a in PUBLISHED if a["recipe"] is None or a["recipe"] in keys]
    report["seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(report, indent=1)
    print(markdown(report) if args.markdown else text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
