"""``python -m trainer.evaluate``: saved weights (a LoRA, a finetuned denoiser, or none: the base model) evaluated
on fixed prompts and seeds, as the trainer evaluates every ``run.eval_every`` epochs (trainer/evaluate.py).

    python -m trainer.evaluate --model tiny --lora outputs/tiny/lora --prompts held_out.txt --reward compression

Writes eval.json (the rewards: mean, per category, per prompt) and eval.png (the grid) to ``--out`` and prints
the JSON. The weights folder is checked before any model loads (a copy cut short is named, not loaded).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from trainer.config.group import Bounded
from trainer.evaluate import eval_prompts, evaluate, save_grid, summary
from trainer.prompts import checked_file


class EvalSettings(Bounded, BaseSettings):
    """Deterministic evaluation of a model (and its LoRA or finetuned denoiser) on fixed prompts and seeds."""

    model_config = SettingsConfigDict(cli_prog_name="python -m trainer.evaluate", cli_implicit_flags=True)

    model: str = Field(
        "tiny", description='"tiny" / "tiny-sdxl" / "tiny-sd3" / "tiny-flux" or a diffusers model id / path'
    )
    cache_dir: Path | None = None
    lora: Path | None = Field(None, description="a folder with pytorch_lora_weights.safetensors (a run's lora/)")
    denoiser: Path | None = Field(
        None, description="or a fully finetuned denoiser folder (a run's unet/ or transformer/)"
    )
    prompts: Annotated[Path | None, AfterValidator(checked_file)] = Field(
        None, description="one prompt per line; default: --count draws of --prompt_fn"
    )
    prompt_fn: str = Field("simple_animals", description="the trainer's prompt.fn names")
    count: int = Field(16, gt=0)
    per_prompt: int = Field(1, gt=0, description="images per prompt, each from its own seed")
    seed: int = Field(42, description="image i from the noise of seed + i: the trainer's run.eval_seed")
    steps: int = Field(40, gt=0, description="deterministic sampler steps")
    guidance_scale: float = Field(5.0, ge=1.0)
    resolution: int | None = Field(None, gt=0, description="pixels; default: the model's native size")
    num_frames: int | None = Field(None, gt=0, description="a video model's frames; default: its pipeline's")
    batch_size: int = Field(8, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    reward: str = Field("compression", description="a scorer name, or module:function (with --reward_url: a label)")
    reward_url: list[str] = Field([], description="reward server URL(s) instead of an in-process scorer")
    reward_options: dict[str, str | int | float] = {}
    out: Path = Field(Path("eval"), description="folder for eval.json and eval.png")

    @field_validator("lora")
    @classmethod
    def _lora(cls, folder: Path | None) -> Path | None:
        return _weights_folder(folder, "pytorch_lora_weights*.safetensors", "a run's lora/ folder")

    @field_validator("denoiser")
    @classmethod
    def _denoiser(cls, folder: Path | None) -> Path | None:
        return _weights_folder(folder, "config.json", "a run's unet/ or transformer/ folder")

    @model_validator(mode="after")
    def _one_of(self) -> "EvalSettings":
        if self.lora is not None and self.denoiser is not None:
            raise ValueError("give at most one of --lora or --denoiser")
        return self

    def cli_cmd(self) -> None:
        print(json.dumps(run_evaluation(self), indent=2))


def _weights_folder(folder: Path | None, marker: str, what: str) -> Path | None:
    """A weights folder checked before any model loads: it exists, holds ``marker`` (a file name or a glob: Wan2.2's
    low-noise expert's LoRA alone is pytorch_lora_weights_transformer_2.safetensors), and each safetensors
    file in it has a readable header whose tensors fit the file (a copy cut short fails here)."""
    if folder is None:
        return None
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    if not any(path.is_file() for path in folder.glob(marker)):
        raise ValueError(f"{folder} holds no {marker} ({what})")
    if marker == "config.json" and not any(folder.glob("diffusion_pytorch_model*")):
        raise ValueError(f"{folder} holds no diffusion_pytorch_model weights ({what})")
    for weights in sorted(folder.glob("*.safetensors")):
        problem = _safetensors_problem(weights)
        if problem:
            raise ValueError(f"{weights} is not a readable safetensors file ({problem})")
    return folder


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (an 8-byte header length, a JSON header, the tensors'
    data within the file), or None; reads the header only."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > size - 8:
            return f"its header claims {length} bytes of a {size}-byte file"
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            return f"the header is not JSON: {exc}"
    ends = (
        [
            t["data_offsets"][1]
            for k, t in header.items()
            if k != "__metadata__" and isinstance(t, dict) and len(t.get("data_offsets", ())) == 2
        ]
        if isinstance(header, dict)
        else None
    )
    if ends is None:
        return "the header is not a map of tensors"
    if max(ends, default=0) > size - 8 - length:
        return f"cut short: its tensors need {max(ends) + 8 + length} bytes, the file has {size}"
    return None


def run_evaluation(s: EvalSettings) -> dict:
    import torch

    from trainer.config import Config
    from trainer.families.models import load_family, load_tuned
    from trainer.prompts import make_prompt_fn
    from trainer.rewards import Rewards

    # The trainer's own config checks the model, prompt and reward settings before anything loads.
    cfg = Config(
        pretrained={"model": s.model, "cache_dir": s.cache_dir},
        run={"mixed_precision": s.mixed_precision, "eval_seed": s.seed},
        prompt={"fn": s.prompt_fn, "eval_path": s.prompts, "eval_count": s.count},
        reward={"scorer": s.reward, "url": s.reward_url, "options": s.reward_options},
        sample={"num_frames": s.num_frames} if s.num_frames else {},  # refused by a family without frames
    )
    prompts, metadata = eval_prompts(cfg, make_prompt_fn(cfg.prompt.fn))
    prompts = [p for p in prompts for _ in range(s.per_prompt)]
    metadata = [m for m in metadata for _ in range(s.per_prompt)]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rewards = Rewards(cfg.reward, device=str(device))
    try:
        family = load_family(cfg, device)
        load_tuned(family, s.lora, s.denoiser)
        dtype = family.denoiser.dtype
        autocast = (
            (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
        )
        images, scored = evaluate(
            family,
            family.denoiser,
            prompts,
            metadata,
            rewards,
            num_steps=s.steps,
            guidance_scale=s.guidance_scale,
            resolution=s.resolution or family.native_resolution(),
            seeds=[s.seed + i for i in range(len(prompts))],
            batch_size=s.batch_size,
            autocast=autocast,
        )
    finally:
        rewards.close()
    total = rewards.combine({n: out.scores for n, out in scored.items()})
    result = {
        "model": s.model,
        "lora": str(s.lora) if s.lora else None,
        "denoiser": str(s.denoiser) if s.denoiser else None,
        "steps": s.steps,
        "guidance_scale": s.guidance_scale,
        "seed": s.seed,
        **summary(prompts, scored, total),
    }
    s.out.mkdir(parents=True, exist_ok=True)
    save_grid(
        images, prompts, total, s.out / "eval.png", columns=s.per_prompt if s.per_prompt > 1 else min(8, len(prompts))
    )
    (s.out / "eval.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> None:
    from protocol.errors import cli_message

    try:
        CliApp.run(EvalSettings, cli_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:  # a setting or file of the user's: said before any model loads, as the trainer does
        print(f"python -m trainer.evaluate: {cli_message(exc)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
