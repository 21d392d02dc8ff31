"""Sharding the trained denoiser over the processes with torch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

``run.sharding fsdp`` shards every parameter of the denoiser along its first dimension over all processes
(ZeRO-3 / FULL_SHARD); ``hybrid`` over the processes of one machine, replicated across machines (HYBRID_SHARD
on a [machines, processes per machine] mesh, as Flow-Factory's multi-node Wan config and flow_grpo's
Qwen-Image trainer run it). Each block the family names (``Family.shard_blocks``: a transformer or UNet block)
is one FSDP unit, gathered for its forward and freed after it; the root holds the rest. Only the denoiser is
sharded: the frozen text encoders and VAE stay whole on every process.

We apply torch's ``fully_shard`` ourselves instead of accelerate's FSDP plugin: the plugin does not run without
a GPU (two ``accelerate launch`` processes start non-distributed), while ``fully_shard`` runs on CPU with gloo,
so the same code is tested here and runs on GPUs. accelerate still launches the processes, sets up the process
group and wraps the optimizer; the denoiser is not passed to ``accelerator.prepare`` (that would wrap it in DDP).

What this changes for the rest of the engine, each handled where it happens:
- the trainable parameters are DTensors holding this process's shard: the optimizer, the EMA and the lagging
  weights hold shards too, never the whole tensor on one process;
- a parameter's storage cannot be swapped (``p.data = ...`` is not seen by FSDP's all-gather): weights are
  swapped by copying in place (``trainer.families.models.weights_swapped``);
- every process must run the denoiser equally often (each forward all-gathers): evaluation pads the processes'
  shares to the same number of batches;
- checkpoints go through torch.distributed.checkpoint (trainer/checkpoint.py), which reshards on load: a run
  resumes on another number of processes, or on one without sharding.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from trainer.config import Config


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def any_sharded(params: dict[str, torch.Tensor]) -> bool:
    """Whether the run shards these parameters (they are sharded together or not at all)."""
    return any(is_sharded(p) for p in params.values())


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (collective: every process calls it), or the tensor itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor, or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def _mesh(strategy: str, device_type: str):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if strategy == "fsdp":
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    # Set by torchrun and accelerate launch on every machine: the processes this machine runs.
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % per_machine:
        raise ValueError(
            f"run.sharding hybrid: {world} processes do not split into machines of {per_machine} (LOCAL_WORLD_SIZE)"
        )
    return init_device_mesh(device_type, (world // per_machine, per_machine), mesh_dim_names=("replicate", "shard"))


def _several_processes() -> bool:
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_world_size() > 1


def _fully_shard(module: torch.nn.Module, blocks: set[str] | tuple[str, ...], options: dict) -> int:
    """Each submodule whose class is named in ``blocks`` one FSDP unit, then the root; the number of units."""
    from torch.distributed.fsdp import fully_shard

    units = [m for m in module.modules() if type(m).__name__ in blocks]
    for unit in units:
        fully_shard(unit, **options)
    fully_shard(module, **options)
    return len(units) + 1


def _same_start(denoiser: torch.nn.Module) -> None:
    """Every process starts from rank 0's trainable weights, as DDP does when it wraps a model: peft draws the
    LoRA initialisation from each process's own seed, and sharding would otherwise stitch the shards of
    different initialisations together (the frozen weights are loaded from the same files everywhere)."""
    import torch.distributed as dist

    with torch.no_grad():
        for p in denoiser.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)


def shard(denoiser: torch.nn.Module, blocks: tuple[str, ...], cfg: Config, device_type: str) -> int:
    """Shard ``denoiser`` in place: each module whose class is named in ``blocks`` one FSDP unit, then the root.
    Call after the adapters are added and the weights are set to train (the sharded parameters replace the
    module's); returns the number of units. One process: nothing to shard across, the denoiser is left whole."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    if not _several_processes():
        return 0
    _same_start(denoiser)
    options = {
        "mesh": _mesh(cfg.run.sharding, device_type),
        "reshard_after_forward": cfg.run.reshard_after_forward,
        # bf16 compute with fp32 gradient reduction over fp32 trained weights (flow_grpo, verl-omni, DanceGRPO)
        "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if cfg.run.mixed_precision == "bf16"
        else MixedPrecisionPolicy(),
        "offload_policy": CPUOffloadPolicy() if cfg.run.cpu_offload else OffloadPolicy(),
    }
    if not any(type(module).__name__ in blocks for module in denoiser.modules()):
        raise ValueError(
            f"run.sharding: the {type(denoiser).__name__} has none of the blocks {blocks} to shard: "
            "is the family's shard_blocks right for this checkpoint?"
        )
    return _fully_shard(denoiser, blocks, options)


def shard_text_encoders(pipe, cfg: Config, device_type: str) -> list[str]:
    """run.shard_text_encoders: each frozen text encoder of the pipeline sharded like the denoiser, one unit per
    layer its class names unsplittable (transformers' ``_no_split_modules``: T5Block, CLIPEncoderLayer,
    Qwen2_5_VLDecoderLayer), as flow_grpo shards Qwen-Image's Qwen2.5-VL. Frozen: no gradients, no optimizer
    state, only their share of the memory. Returns the encoders sharded."""
    if not _several_processes():
        return []
    from trainer.families import text_encoders

    options, sharded = {"mesh": _mesh(cfg.run.sharding, device_type), "reshard_after_forward": True}, []
    for name, encoder in text_encoders(pipe).items():
        blocks = set(getattr(encoder, "_no_split_modules", None) or ())
        if blocks:  # not a transformers model: nothing it names unsplittable
            _fully_shard(encoder, blocks, options)
            sharded.append(name)
    return sharded


def shard_trainable(family, trainable: dict[str, torch.nn.Parameter], cfg: Config, accelerator):
    """run.sharding: the family's denoiser sharded; returns its trainable parameters by the same names (the
    sharded ones, which replace them) and logs each process's share of them. Unsharded with one process."""
    units = shard(family.denoiser, family.shard_blocks, cfg, accelerator.device.type)
    if not units:
        accelerator.print(f"run.sharding {cfg.run.sharding}: one process, nothing to shard across")
        return trainable
    sharded = {name: p for name, p in family.denoiser.named_parameters() if p.requires_grad}
    if cfg.run.shard_text_encoders:
        encoders = shard_text_encoders(family.pipe, cfg, accelerator.device.type)
        accelerator.print(f"run.shard_text_encoders: {', '.join(encoders) or 'none to shard'}")
    print(
        f"process {accelerator.process_index}: run.sharding {cfg.run.sharding}, {units} units: {share(sharded)}",
        flush=True,
    )
    return sharded


def agreed(value: int, trainable: dict[str, torch.Tensor]) -> int:
    """A draw that decides how many forwards a step runs (ReFL's stopping step, AlignProp's truncation):
    each process's own, unless the model is sharded, whose forwards every process runs together: then rank
    0's, everywhere."""
    if not any_sharded(trainable):
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def share(params: dict[str, torch.Tensor]) -> str:
    """This process's share of the trainable parameters, for the run's log."""
    mine = sum(local(p).numel() for p in params.values())
    total = sum(p.numel() for p in params.values())
    return f"{mine:,} of {total:,} trainable parameters ({mine / max(total, 1):.1%})"


def set_gradient_sync(model: torch.nn.Module, last_backward: bool, lora: bool) -> None:
    """Under gradient accumulation, LoRA reduce-scatters its gradients only on the step's last backward
    (FSDP2's equivalent of DDP's ``no_sync``, which accelerate's ``accumulate`` finds only on DDP models). A
    full finetune reduce-scatters after every backward: deferring would keep every process's unsharded fp32
    gradients of the whole model until the last one (docs/scale.md)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last_backward or not lora)


def gathered_state_dict(denoiser: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Collective: the denoiser's whole weights (only the trainable ones with ``trainable_only``) on CPU in the
    main process, gathered once for saving; an empty dict on the others."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        denoiser,
        options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only),
    )
