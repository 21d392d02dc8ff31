"""The settings groups of where a run goes and what it starts from: ``run`` (output, seeds, precision, logging,
checkpoints, evaluation) and ``pretrained`` (the model). Part of ``trainer.config.Config``; in a file of their
own to keep trainer/config/__init__.py readable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from trainer.config.group import _Group


class RunConfig(_Group):
    output_dir: Path = Field(
        Path("outputs/tiny"),
        description="config, metrics.jsonl, logs and weights go here; default outputs/<preset name>",
    )
    seed: int = 42
    num_epochs: int = Field(20, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="fp16/bf16: frozen weights in half")
    allow_tf32: bool = True
    sharding: Literal["none", "fsdp", "hybrid"] = Field(
        "none",
        description="shard the trained denoiser, its gradients and optimizer state over the processes with "
        "torch's FSDP2, one unit per block the family names (docs/scale.md): fsdp over all processes "
        "(FULL_SHARD, ZeRO-3), hybrid within each machine and replicated across machines (HYBRID_SHARD); "
        "none: every process holds the whole model (DDP)",
    )
    reshard_after_forward: bool = Field(
        True,
        description="sharding: free a block's gathered weights after its forward and gather them again for "
        "the backward (FULL_SHARD); false keeps them (SHARD_GRAD_OP, ZeRO-2: more memory, less communication)",
    )
    shard_text_encoders: bool = Field(
        False,
        description="sharding: shard the frozen text encoders too, one unit per layer (T5-XXL, Qwen2.5-VL: what "
        "flow_grpo shards for Qwen-Image); false: each process holds them whole",
    )
    offload_text_encoders: bool = Field(
        False,
        description="keep the frozen text encoders' weights in CPU memory, each layer's moved to the device for "
        "its forward (accelerate's cpu_offload, as diffusers' sequential offload): T5-XXL's 9.5 GB or "
        "Qwen2.5-VL's 16.6 GB off every GPU, prompt encoding slower; the alternative to run.shard_text_encoders",
    )
    cpu_offload: bool = Field(
        False,
        description="sharding: keep the sharded weights, gradients and optimizer state in CPU memory between "
        "uses (FSDP2's CPUOffloadPolicy): less GPU memory, slower steps",
    )
    compile: str | None = Field(
        None,
        description="torch.compile the denoiser for sampling and training with this "
        "backend (inductor, or another of torch._dynamo.list_backends()); default off: on "
        "CPU the tiny run compiled for 2 minutes and then ran no faster",
    )
    channels_last: bool = Field(
        False,
        description="the denoiser's weights in channels-last memory format (measured "
        "on the tiny CPU run: sampling 7% faster, training the same)",
    )
    cpu_threads: int = Field(
        0,
        ge=0,
        description="CPU runs: torch threads; 0: the cores no other process is running "
        "on, looked at every epoch (unless OMP_NUM_THREADS is set)",
    )
    log_with: Literal["none", "tensorboard", "wandb"] = "tensorboard"
    log_images_every: int = Field(5, ge=0, description="save and log a captioned sample grid every N epochs (0: never)")
    save_freq: int = Field(
        20, ge=0, description="checkpoint every this many epochs (and always at the end); 0: end only"
    )
    checkpoint_limit: int = Field(5, gt=0, description="how many checkpoints to keep")
    push_to_hub: str | None = Field(
        None,
        description="hub repo id to upload the final weights to (off by default; "
        "uses HF_TOKEN or your huggingface-cli login)",
    )
    stop_grace_s: float = Field(
        25.0,
        ge=0,
        description="seconds from SIGTERM to a saved checkpoint (trainer/interrupt.py): outside the updates the "
        "last finished epoch is saved at once; during them they finish and the epoch is saved if that fits in "
        "this time, else they are dropped; then exit status 143. 25 fits the 30 s that Kubernetes "
        "(terminationGracePeriodSeconds), Slurm (KillWait; --signal=TERM@N sends it N s early) and torchrun / "
        "accelerate launch (--shutdown_timeout) wait before they kill",
    )
    resume_from: Literal["auto"] | Path | None = Field(
        None,
        description="a run folder (its newest checkpoint) or one checkpoint folder; auto: run.output_dir's newest "
        "checkpoint if it has one, else a fresh start (a job that is restarted after preemption)",
    )
    eval_every: int = Field(
        0,
        ge=0,
        description="evaluate every N epochs, from before the first and after the last "
        "(deterministic sampling on fixed prompts and seeds, see trainer/evaluate.py); 0: never",
    )
    eval_seed: int = Field(
        42,
        description="image i of an evaluation starts from the noise of seed eval_seed + i "
        "(and drawn evaluation prompts from this seed): not run.seed, so runs of different "
        "training seeds are evaluated on the same images",
    )
    eval_scorer: str | None = Field(
        None,
        description="evaluate with this in-process scorer instead of the reward "
        "(e.g. train ReFL on a CLIP score, evaluate with the shapes verifier)",
    )
    eval_drift: bool = Field(
        True,
        description="each evaluation also logs, on the policy's own samples, its prediction's norm over the base "
        "model's (NormGuard's measure of reward hacking) and the base's and its own denoising loss "
        "(trainer/drift.py): two more forwards per image; needs LoRA or a full finetune's frozen base copy",
    )

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, path: Path) -> Path:
        return checked_output_dir(path)

    @field_validator("eval_scorer")
    @classmethod
    def _eval_scorer(cls, name: str | None) -> str | None:
        if name is not None:
            from scorers.scorer import scorer_target

            scorer_target(name)
        return name


def output_dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot be made or written as an output folder, said before any model loads (os.makedirs
    would say it with a traceback after): a name too long, a file where a folder must be, no write access."""
    import os

    existing = next((p for p in [path, *path.parents] if os.path.lexists(p)), Path("."))
    limit = os.pathconf(existing if existing.is_dir() else existing.parent, "PC_NAME_MAX")
    long = next((part for part in path.parts if len(part.encode()) > limit), None)
    if long is not None:
        return f"{path}: the name {long!r} is longer than this file system's {limit} characters"
    if not existing.is_dir():
        return f"{path} is not a folder" if existing == path else f"{path}: {existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{path}: {existing} is not writable"
    return None


def checked_output_dir(path: Path) -> Path:
    """A settings validator of an output folder (run.output_dir, trainer.label's --out)."""
    problem = output_dir_problem(path)
    if problem:
        raise ValueError(problem)
    return path


class PretrainedConfig(_Group):
    model: str = Field(
        "tiny",
        description='"tiny" / "tiny-sdxl" / "tiny-sd3" / "tiny-flux" / "tiny-flux2" / "tiny-qwenimage" / "tiny-wan" '
        '(embedded, built offline), "tiny-shapes" / "tiny-shapes-sd3" (shipped, pretrained on the shapes world) or a '
        "diffusers model id / path (a StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, "
        "FluxPipeline, Flux2KleinPipeline, QwenImagePipeline or WanPipeline)",
    )
    revision: str | None = None
    load_t5: bool = Field(
        True,
        description="SD3: load the T5 encoder (text_encoder_3); without it (about 9 GB less in "
        "fp16) its tokens are zeros, as in StableDiffusion3Pipeline",
    )
    max_sequence_length: int | None = Field(
        None,
        gt=0,
        le=512,
        description="FLUX: T5 tokens per prompt (at most 512, "
        "as FluxPipeline allows); default FluxPipeline's "
        "512 (fewer if its tokenizer's model_max_length is smaller); Flow-GRPO's "
        "FLUX runs encode 128; FLUX.2 [klein]: Qwen3 tokens per prompt, default Flux2KleinPipeline's 512; "
        "Qwen-Image: its prompt tokens after the template's, default QwenImagePipeline's 512; Wan: UMT5 tokens, "
        "default WanPipeline's 512",
    )
    train_experts: Literal["high", "low", "both"] | None = Field(
        None,
        description="Wan2.2's two experts: which trains, the high-noise transformer (default) or the low-noise "
        "transformer_2, the other sampling frozen; or both (Flow-Factory's default; LoRA only)",
    )
    cache_dir: Path | None = Field(None, description="where the tiny model is built (default ~/.cache/diffusion-rl)")
