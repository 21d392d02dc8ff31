"""``python -m trainer.before_after``: the same seeds through a base model and base + LoRA, side by side, scored.

    python -m trainer.before_after --lora outputs/tiny/lora --prompts '["a cat", "an owl"]'

writes ``outputs/tiny/before_after.png``: the run folder (the one holding ``lora/`` or ``unet/``), unless
``--out`` says otherwise.

Each row is one prompt: the base model's images, then the finetuned ones from the same noise. Captions
carry each image's reward; a JSON summary (mean reward before and after) goes to stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from trainer.config.group import Bounded


class SampleSettings(Bounded, BaseSettings):
    """Render a before/after grid for given prompts from a base model and a LoRA."""

    model_config = SettingsConfigDict(cli_prog_name="python -m trainer.before_after", cli_implicit_flags=True)

    model: str = Field(
        "tiny", description='"tiny" / "tiny-sdxl" / "tiny-sd3" / "tiny-flux" or a diffusers model id / path'
    )
    cache_dir: Path | None = None
    lora: Path | None = Field(None, description="a folder with pytorch_lora_weights.safetensors (a run's lora/)")
    unet: Path | None = Field(None, description="or a fully finetuned denoiser folder (a run's unet/ or transformer/)")
    prompts: list[str] = ["a cat", "a dog", "an owl"]
    per_prompt: int = Field(2, gt=0)
    seed: int = 0
    steps: int = Field(20, gt=0)
    guidance_scale: float = 5.0
    eta: float = 1.0
    resolution: int | None = Field(None, gt=0, description="pixels; default: the model's native size")
    num_frames: int | None = Field(None, gt=0, description="a video model's frames; default: its pipeline's")
    reward: str | None = Field("compression", description="in-process scorer for the captions (none: no scores)")
    video_pooling: Literal["mean", "min"] = Field("mean", description="a video's reward from its frames' scores")
    out: Path | None = Field(None, description="where the grid goes (default: before_after.png in the run folder)")

    def cli_cmd(self) -> None:
        if (self.lora is None) == (self.unet is None):
            raise SystemExit("python -m trainer.before_after: give exactly one of --lora or --unet")
        if self.out is None:  # next to the run's other outputs, not wherever the command was typed
            self.out = Path(self.lora or self.unet).resolve().parent / "before_after.png"
        print(json.dumps(render(self)))


def render(s: SampleSettings) -> dict:
    import torch

    from scorers.scorer import create_scorer
    from scorers.video import score_videos
    from trainer.config import Config
    from trainer.families.models import load_family, load_tuned
    from trainer.grid import save_sheet
    from trainer.sampling import sample

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    frames = {"num_frames": s.num_frames} if s.num_frames else {}  # refused by a family without frames
    cfg = Config(pretrained={"model": s.model, "cache_dir": s.cache_dir}, sample=frames)
    family = load_family(cfg, device)
    negative = family.encode_prompts([""])
    prompts = [p for p in s.prompts for _ in range(s.per_prompt)]

    def images() -> "np.ndarray":  # noqa: F821
        generator = torch.Generator(device).manual_seed(s.seed)
        _, final = sample(
            family,
            family.denoiser,
            prompts,
            [{}] * len(prompts),
            negative,
            s.steps,
            s.eta,
            s.guidance_scale,
            s.resolution or family.native_resolution(),
            generator=generator,
        )
        return family.vae.to_uint8(final)

    before = images()
    load_tuned(family, s.lora, s.unet)
    after = images()

    scorer = None
    if s.reward:
        scorer = create_scorer(s.reward)
        scorer.load("cpu")

    def score(x: "np.ndarray") -> list:  # noqa: F821
        if scorer is None:
            return [None] * len(x)
        if x.ndim == 5:  # videos (N, F, H, W, 3): frame scores pooled per video
            return score_videos(scorer, x, prompts, pooling=s.video_pooling).scores
        return scorer.score(x, prompts, [{}] * len(prompts)).scores

    r_before, r_after = score(before), score(after)

    cells, captions = [], []
    for row in range(len(s.prompts)):
        cols = range(row * s.per_prompt, (row + 1) * s.per_prompt)
        for tag, batch, rewards in (("base", before, r_before), ("tuned", after, r_after)):
            for i in cols:
                cells.append(batch[i])
                captions.append(
                    f"{tag} {rewards[i]:+.3f} {prompts[i]}" if rewards[i] is not None else f"{tag} {prompts[i]}"
                )
    save_sheet(cells, captions, 2 * s.per_prompt, s.out)  # videos: frame strips and a .gif beside
    summary = {"out": str(s.out), "prompts": s.prompts, "per_prompt": s.per_prompt}
    if scorer:
        summary |= {
            "reward": s.reward,
            "mean_before": float(sum(r_before) / len(r_before)),
            "mean_after": float(sum(r_after) / len(r_after)),
        }
    return summary


def main(argv: list[str] | None = None) -> None:
    from protocol.errors import cli_message

    try:
        CliApp.run(SampleSettings, cli_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:  # the user's to fix: exit 2, as the other commands
        print(f"python -m trainer.before_after: {cli_message(exc)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
