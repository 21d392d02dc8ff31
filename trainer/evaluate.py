"""Evaluation: a fixed prompt set, fixed seeds, deterministic sampling, rewards as JSON and an image grid.

    python -m trainer.evaluate --model tiny --lora outputs/tiny/lora --prompts held_out.txt --reward compression

Every image starts from its own seed (``seed`` + its index), so the numbers do not depend on the batch size
or the number of processes (beyond float rounding), and a base model and its LoRA are compared on the same
noise. Sampling is deterministic (DDIM eta 0 / the flow ODE) at the evaluation step count: it measures the
model, not the policy's exploration noise. The trainer runs the same function every ``run.eval_every`` epochs on
``prompt.eval_path`` (as Flow-GRPO does) and logs it to eval.jsonl and its trackers.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from trainer.config.group import Bounded

from trainer import tracking
from trainer.prompts import checked_file


def evaluate(
    family,
    model,
    prompts: list[str],
    metadata: list[dict[str, Any]],
    rewards,
    *,
    num_steps: int,
    guidance_scale: float,
    resolution: int,
    seeds: list[int],
    batch_size: int,
    deadline: float = 600.0,
    autocast=contextlib.nullcontext,
) -> tuple[np.ndarray, dict]:
    """uint8 NHWC images and the scorers' outputs ({component: ScoreOutput}) of ``prompts``, image i from
    noise seeded by ``seeds[i]``."""
    import torch

    from trainer.rewards import Pending

    device = model.device
    model.eval()  # the trainer evaluates between updates, which leave the model in training mode
    negative = family.encode_prompts([""])
    restore = getattr(
        family.pipe.scheduler, "num_inference_steps", None
    )  # training re-scores with the sampling schedule
    pending, images = Pending(rewards), []
    try:
        timesteps = family.dynamics.timesteps(num_steps, device)
        for start in range(0, len(prompts), batch_size):
            part = slice(start, start + batch_size)
            x = torch.cat(
                [
                    family.initial_latents(1, resolution, torch.Generator(device).manual_seed(s), device)
                    for s in seeds[part]
                ]
            )
            cond = family.encode_prompts(prompts[part], resolution)
            # sampling.sample without what training needs: no trajectory kept, no log-probs (eta 0 is the ODE)
            with torch.no_grad(), autocast():
                for i, t in enumerate(timesteps):
                    x = family.dynamics.step(family.predict(model, x, t, cond, negative, guidance_scale), i, x, 0.0)[0]
            images.append(family.vae.to_uint8(x))
            pending.add(rewards.submit(images[-1], prompts[part], metadata[part]))
    finally:
        if restore:
            family.dynamics.timesteps(restore, device)
    return np.concatenate(images), pending.wait(deadline)


def summary(prompts: list[str], scored: dict, total: np.ndarray) -> dict:
    """Mean rewards, and per prompt (each of its images) in first-seen order."""
    out = {
        "reward_mean": float(total.mean()),
        "reward_std": float(total.std()),
        **{f"reward_{name}_mean": float(s.scores.mean()) for name, s in scored.items()},
        **tracking.by_category(tracking.sample_records(0, 0, prompts, scored), total),
    }
    order = list(dict.fromkeys(prompts))
    index = np.array([order.index(p) for p in prompts])
    out["per_prompt"] = [
        {
            "prompt": p,
            "reward": float(total[index == k].mean()),
            "rewards": total[index == k].round(6).tolist(),
            **{f"reward_{name}": s.scores[index == k].round(6).tolist() for name, s in scored.items()},
        }
        for k, p in enumerate(order)
    ]
    return out


def save_grid(images: np.ndarray, prompts: list[str], total: np.ndarray, path: Path, columns: int) -> None:
    from trainer.grid import grid

    path.parent.mkdir(parents=True, exist_ok=True)
    grid(list(images), [f"{r:+.3f} {p}" for p, r in zip(prompts, total)], columns=columns).save(path)


def save_before_after(first: tuple, last: tuple, prompts: list[str], path: Path, count: int = 24) -> None:
    """The first image of each of the first ``count`` distinct prompts at two evaluations, side by side:
    the same seeds, so a cell pair differs only by training. ``first``/``last``: (epochs, images, rewards)."""
    from trainer.grid import grid

    firsts = [prompts.index(p) for p in list(dict.fromkeys(prompts))[:count]]
    cells, captions = [], []
    for i in firsts:
        for epochs, images, rewards in (first, last):
            cells.append(images[i])
            captions.append(f"epoch {epochs}: {rewards[i]:+.2f} {prompts[i]}")
    grid(cells, captions, columns=8).save(path)


def eval_prompts(cfg, prompt_fn) -> tuple[list[str], list[dict[str, Any]]]:
    """``prompt.eval_path`` (one prompt per line), else ``prompt.eval_count`` draws of the prompt function from
    an rng of their own (the training prompts' rng, which checkpoints keep, is not touched)."""
    if cfg.prompt.eval_path is not None:
        from trainer.prompts import lines

        prompts = list(lines(cfg.prompt.eval_path, "prompt.eval_path"))
        return prompts, [{} for _ in prompts]
    rng = np.random.default_rng([cfg.run.eval_seed, 1 << 20])
    prompts, metadata = zip(*(prompt_fn(rng) for _ in range(cfg.prompt.eval_count)))
    return list(prompts), list(metadata)


def evaluate_run(run, trained, after_epochs: int, unit: str = "epochs", final: bool | None = None) -> dict:
    """The trainer's periodic evaluation of the weights (``trained.policy``, the bare denoiser a
    ``trainer.run.Trained`` holds) after ``after_epochs`` epochs (or optimizer steps: ``unit``; the record's
    "epoch"), the before/after grid at the ``final`` one (default: after run.num_epochs): each process takes
    every n-th prompt; the main process writes eval.jsonl and eval/after-NNNN.png and logs ``eval/*``. What
    one evaluation leaves the next (the eval scorer, the first evaluation) is ``run.evaluations``."""
    from accelerate.utils import gather_object

    from trainer.rewards import ScoreOutput

    cfg, accelerator = run.cfg, run.accelerator
    prompts, metadata = eval_prompts(cfg, run.prompt_fn)
    mine = list(range(accelerator.process_index, len(prompts), accelerator.num_processes))
    rewards = run.rewards
    if cfg.run.eval_scorer:  # loaded at the first evaluation, kept for the others
        rewards = run.evaluations.rewards(cfg.run.eval_scorer, accelerator.device)
    images, scored = evaluate(
        trained.family,
        trained.policy,
        [prompts[i] for i in mine],
        [metadata[i] for i in mine],
        rewards,
        num_steps=cfg.sample.eval_num_steps or cfg.sample.num_steps,
        guidance_scale=cfg.sample.guidance_scale,
        resolution=cfg.sample.resolution or trained.family.native_resolution(),
        seeds=[cfg.run.eval_seed + i for i in mine],
        batch_size=cfg.sample.batch_size,
        deadline=cfg.reward.deadline,
        autocast=accelerator.autocast,
    )
    rows = gather_object(
        [
            (
                i,
                images[k],
                {n: (float(s.scores[k]), {key: v[k] for key, v in s.info.items()}) for n, s in scored.items()},
            )
            for k, i in enumerate(mine)
        ]
    )
    rows.sort(key=lambda row: row[0])
    scored = {
        n: ScoreOutput(
            np.array([row[2][n][0] for row in rows]),
            {key: [row[2][n][1][key] for row in rows] for key in scored[n].info},
        )
        for n in scored
    }
    total = rewards.combine({n: s.scores for n, s in scored.items()})
    result = {"epoch": after_epochs, **summary([prompts[row[0]] for row in rows], scored, total)}
    accelerator.log({f"eval/{k}": v for k, v in result.items() if k != "per_prompt"}, step=after_epochs)
    if accelerator.is_main_process:
        with open(run.out / "eval.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        shown = np.stack([row[1] for row in rows])
        save_grid(shown, prompts, total, run.out / "eval" / f"after-{after_epochs:04d}.png", columns=min(8, len(rows)))
        evaluations = run.evaluations
        if evaluations.first is None:  # this process's first evaluation: before training, unless resumed
            evaluations.first = (after_epochs, shown, total)
        elif (after_epochs == cfg.run.num_epochs) if final is None else final:
            save_before_after(
                evaluations.first, (after_epochs, shown, total), prompts, run.out / "eval" / "before_after.png"
            )
    accuracy = f" | accuracy {result['accuracy']:.1%}" if "accuracy" in result else ""
    accelerator.print(
        f"eval after {after_epochs} {unit} | reward {result['reward_mean']:+.4f}{accuracy} on {len(prompts)} prompts"
    )
    return result


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
    batch_size: int = Field(8, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    reward: str = Field("compression", description="a scorer name, or module:function (with --reward_url: a label)")
    reward_url: list[str] = Field([], description="reward server URL(s) instead of an in-process scorer")
    reward_options: dict[str, str | int | float] = {}
    out: Path = Field(Path("eval"), description="folder for eval.json and eval.png")

    @field_validator("lora")
    @classmethod
    def _lora(cls, folder: Path | None) -> Path | None:
        return _weights_folder(folder, "pytorch_lora_weights.safetensors", "a run's lora/ folder")

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
    """A weights folder checked before any model loads: it exists, holds ``marker``, and each safetensors
    file in it has a readable header whose tensors fit the file (a copy cut short fails here)."""
    if folder is None:
        return None
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    if not (folder / marker).is_file():
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
