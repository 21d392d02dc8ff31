"""Pretrain ``tiny-shapes`` (a small Stable Diffusion pipeline that draws the shapes world from its captions) or,
with ``--family sd3``, ``tiny-shapes-sd3`` (its flow-matching counterpart, an SD3 MMDiT pipeline).

    python -m trainer.tools.shapes_model --out outputs/shapes-pretrain    # about an hour on 2 CPU cores
    python -m trainer.tools.shapes_model --family sd3 --out outputs/shapes-sd3-pretrain --unet-steps 10000 \
        --unet-batch 32 --unet-lr 7e-4 --latents 32768 --threads 1   # the shipped model: 93 min on one busy core

Two stages, each resumable from its newest checkpoint (run the same command again), seeded and therefore
reproducible (each step's data and noise come from generators seeded by the step number):

1. the VAE (f8, 4 latent channels) learns to reconstruct rendered images (MSE + L1, a small KL as SD's);
   its latents' std sets ``scaling_factor``, as Stable Diffusion's 0.18215 was set;
2. a CLIP text encoder and UNet learn together from scratch by epsilon prediction on the VAE's latents of
   captioned renders of the world's training captions (10% of captions dropped, for classifier-free
   guidance), under Stable Diffusion's scaled-linear schedule.

The result is a StableDiffusionPipeline folder (``out/pipeline``, fp16 safetensors) that the package
ships as ``trainer/weights/tiny-shapes`` and ``pretrained.model tiny-shapes`` loads.

``--family sd3`` keeps tiny-shapes' VAE (frozen; no VAE stage) and tokenizer, and trains an
SD3Transformer2DModel with the CLIP pair SD3 has (no T5: StableDiffusion3Pipeline then feeds zeros in its
place), both encoders starting from tiny-shapes' text encoder, by the rectified-flow loss with logit-normal
timesteps (Esser et al. 2024, "Scaling Rectified Flow Transformers", sections 2 and 3.1): x_t = (1 - t) x_0 +
t eps, target eps - x_0, t = sigmoid(n), n ~ N(0, 1). The latents are shifted and scaled to zero mean and unit
variance as SD3's VAE config records (shift_factor, scaling_factor). It ships as
``trainer/weights/tiny-shapes-sd3``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from scorers import world
from trainer.tools.shapes_pipelines import build, build_sd3


class Settings(BaseSettings):
    model_config = SettingsConfigDict(cli_parse_args=False, cli_kebab_case=True, cli_implicit_flags=True)

    out: Path = Field(Path("outputs/shapes-pretrain"), description="checkpoints and the finished pipeline")
    family: Literal["sd1", "sd3"] = Field(
        "sd1",
        description="sd1: tiny-shapes (VAE, then UNet by epsilon "
        "prediction); sd3: tiny-shapes-sd3 (MMDiT by flow matching, tiny-shapes' VAE)",
    )
    seed: int = 0
    vae_steps: int = Field(1000, ge=0)
    vae_batch: int = Field(32, gt=0)
    vae_lr: float = 1e-3
    unet_steps: int = Field(9000, ge=0, description="the denoiser's steps (the UNet, or the transformer for sd3)")
    unet_batch: int = Field(32, gt=0)
    unet_lr: float = 5e-4
    drop_caption: float = Field(0.1, ge=0, le=1, description="share of captions replaced by '' (for guidance)")
    latents: int = Field(32768, gt=0, description="captioned renders encoded once for the UNet stage")
    save_every: int = Field(500, gt=0, description="steps between checkpoints")
    threads: int = Field(0, ge=0, description="torch threads (0: torch's default)")
    stop_after: int = Field(
        0,
        ge=0,
        description="save and exit after this many steps of this invocation (0: run "
        "to the end); the same command again resumes",
    )


class Stopped(Exception):
    pass


def captions(rng: np.random.Generator, n: int) -> list[str]:
    return [world.sample_caption(rng, "train")[0] for _ in range(n)]


def renders(caps: list[str], rng: np.random.Generator) -> torch.Tensor:
    """Images of ``caps`` in [-1, 1], NCHW."""
    images = np.stack([world.render(c, rng) for c in caps])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


class Stage:
    """One stage's modules, AdamW and step, saved to and resumed from ``out/<name>-checkpoint`` (safetensors)."""

    taken = 0  # steps this invocation, over both stages (Settings.stop_after)

    def __init__(self, name: str, out: Path, modules: dict[str, torch.nn.Module], lr: float, steps: int):
        self.folder, self.modules, self.steps, self.step = out / f"{name}-checkpoint", modules, steps, 0
        self.params = [p for m in modules.values() for p in m.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=1e-2)
        self.lr = lr
        if (self.folder / "state.json").exists():
            self.load()

    def set_lr(self) -> None:
        warmup = min(1.0, (self.step + 1) / 200)  # then cosine to a tenth
        cosine = 0.55 + 0.45 * math.cos(math.pi * self.step / max(1, self.steps))
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * warmup * cosine

    def save(self) -> None:
        from safetensors.torch import save_file

        staging = self.folder.with_name(self.folder.name + ".tmp")
        staging.mkdir(parents=True, exist_ok=True)
        for name, module in self.modules.items():
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, staging / f"{name}.safetensors")
        moments = {
            f"{i}.{k}": v
            for i, p in enumerate(self.params)
            for k, v in self.optimizer.state.get(p, {}).items()
            if torch.is_tensor(v)
        }
        save_file(
            {k: v.reshape(v.shape or (1,)).contiguous() for k, v in moments.items()}, staging / "adamw.safetensors"
        )
        (staging / "state.json").write_text(json.dumps({"step": self.step}))
        if self.folder.exists():
            import shutil

            shutil.rmtree(self.folder)
        staging.rename(self.folder)

    def load(self) -> None:
        from safetensors.torch import load_file

        for name, module in self.modules.items():
            module.load_state_dict(load_file(self.folder / f"{name}.safetensors"))
        moments = load_file(self.folder / "adamw.safetensors")
        for i, p in enumerate(self.params):
            if f"{i}.exp_avg" in moments:
                self.optimizer.state[p] = {
                    "step": moments[f"{i}.step"].reshape(()),
                    "exp_avg": moments[f"{i}.exp_avg"],
                    "exp_avg_sq": moments[f"{i}.exp_avg_sq"],
                }
        self.step = json.loads((self.folder / "state.json").read_text())["step"]

    def update(self, loss: torch.Tensor, s: Settings) -> None:
        """One optimizer step; checkpoints every ``s.save_every`` steps and at the end, and stops (``Stopped``)
        when this invocation has taken ``s.stop_after`` steps."""
        self.set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.step += 1
        Stage.taken += 1
        if self.step % s.save_every == 0 or self.step == self.steps or Stage.taken == s.stop_after:
            self.save()
        if Stage.taken == s.stop_after:
            raise Stopped


def train_vae(s: Settings, vae) -> None:
    from tqdm import tqdm

    stage = Stage("vae", s.out, {"vae": vae}, s.vae_lr, s.vae_steps)
    vae.train()
    with tqdm(total=s.vae_steps, initial=stage.step, desc="vae") as bar:
        while stage.step < s.vae_steps:
            rng = np.random.default_rng([s.seed, 1, stage.step])
            x = renders(captions(rng, s.vae_batch), rng)
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(
                posterior.mean.shape, generator=torch.Generator().manual_seed(stage.step)
            )
            recon = vae.decode(z).sample
            kl = posterior.kl().mean() / x[0].numel()
            loss = torch.nn.functional.mse_loss(recon, x) + 0.5 * (recon - x).abs().mean() + 1e-4 * kl
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            stage.update(loss, s)
    vae.eval().requires_grad_(False)


def encoded(s: Settings, vae) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The UNet stage's captions and their renders' latent means and stds, cached in ``out``."""
    from safetensors.torch import load_file, save_file

    file = s.out / "latents.safetensors"
    if not file.exists():
        from tqdm import tqdm

        rng = np.random.default_rng([s.seed, 2])
        caps = captions(rng, s.latents)
        means, stds = [], []
        with torch.no_grad():
            for start in tqdm(range(0, s.latents, 256), desc="encoding"):
                posterior = vae.encode(renders(caps[start : start + 256], rng)).latent_dist
                means.append(posterior.mean)
                stds.append(posterior.std)
        save_file({"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous()}, file)
        (s.out / "captions.json").write_text(json.dumps(caps))
    tensors = load_file(file)
    return json.loads((s.out / "captions.json").read_text()), tensors["mean"], tensors["std"]


def epsilon_loss(pipe, z: torch.Tensor, batch: list[str], gen: torch.Generator) -> torch.Tensor:
    """Stable Diffusion's: predict the noise added at a uniform DDPM timestep (the text encoder's last layer)."""
    tokenizer, alphas = pipe.tokenizer, pipe.scheduler.alphas_cumprod
    ids = tokenizer(batch, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    t = torch.randint(0, len(alphas), (len(batch),), generator=gen)
    noise = torch.randn(z.shape, generator=gen)
    a = alphas[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * z + (1 - a).sqrt() * noise
    return torch.nn.functional.mse_loss(pipe.unet(noisy, t, pipe.text_encoder(ids)[0]).sample, noise)


def flow_loss(pipe, z: torch.Tensor, batch: list[str], gen: torch.Generator) -> torch.Tensor:
    """SD3's rectified flow (Esser et al. 2024, eq. 1 and 3.1): the velocity eps - x_0 at x_t = (1 - t) x_0 + t eps,
    t logit-normal (m 0, s 1); the text through the pipeline's own encode_prompt, as it samples."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        batch, None, None, device=z.device, do_classifier_free_guidance=False, max_sequence_length=1
    )  # T5's 256 zeros as one (trainer/families/zero_t5.py)
    t = torch.sigmoid(torch.randn(len(batch), generator=gen))
    noise = torch.randn(z.shape, generator=gen)
    x_t = (1 - t.view(-1, 1, 1, 1)) * z + t.view(-1, 1, 1, 1) * noise
    v = pipe.transformer(
        hidden_states=x_t,
        timestep=t * pipe.scheduler.config.num_train_timesteps,
        encoder_hidden_states=embeds,
        pooled_projections=pooled,
        return_dict=False,
    )[0]
    return torch.nn.functional.mse_loss(v, noise - z)


def latent_layout(s: Settings, means: torch.Tensor, vae) -> tuple[float, float]:
    """The VAE config's shift and scale that make the latents the denoiser sees zero-mean (sd3, as SD3's
    shift_factor) and unit-variance (as SD's 0.18215), recorded in the config the pipeline decodes with."""
    if s.family == "sd1":
        scale = float(1 / means.std())
        vae.register_to_config(scaling_factor=scale)
        return 0.0, scale
    shift = float(means.mean())
    scale = float(1 / (means - shift).std())
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    return shift, scale


def train_denoiser(s: Settings, pipe) -> None:
    """The UNet (sd1) or transformer (sd3) and the text encoder(s), trained together on the cached latents."""
    from tqdm import tqdm

    caps, means, stds = encoded(s, pipe.vae)
    shift, scale = latent_layout(s, means, pipe.vae)
    if s.family == "sd1":
        name, loss_fn, modules = "unet", epsilon_loss, {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    else:
        name, loss_fn = "transformer", flow_loss
        modules = {
            "transformer": pipe.transformer,
            "text_encoder": pipe.text_encoder,
            "text_encoder_2": pipe.text_encoder_2,
        }
    stage = Stage(name, s.out, modules, s.unet_lr, s.unet_steps)
    for module in modules.values():
        module.train()
    with tqdm(total=s.unet_steps, initial=stage.step, desc=" + ".join(modules)) as bar:
        while stage.step < s.unet_steps:
            rng = np.random.default_rng([s.seed, 3, stage.step])
            gen = torch.Generator().manual_seed(stage.step)
            rows = torch.from_numpy(rng.integers(len(caps), size=s.unet_batch))
            z = (means[rows] + stds[rows] * torch.randn(means[rows].shape, generator=gen) - shift) * scale
            batch = [caps[i] if rng.random() >= s.drop_caption else "" for i in rows.tolist()]
            loss = loss_fn(pipe, z, batch, gen)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            stage.update(loss, s)
    for module in modules.values():
        module.eval()


def main(argv: list[str] | None = None) -> None:
    s = CliApp.run(Settings, cli_args=argv)
    if s.threads:
        torch.set_num_threads(s.threads)
    s.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pipe = build(s.seed) if s.family == "sd1" else build_sd3(s.seed)
    try:
        if s.family == "sd1":
            train_vae(s, pipe.vae)
        train_denoiser(s, pipe)
    except Stopped:
        print(f"stopped after {s.stop_after} steps; run the same command again to go on")
        return
    pipe.to(torch.float16).save_pretrained(s.out / "pipeline")  # fp16 on disk: half the size; loads as any dtype
    if (
        s.family == "sd3"
    ):  # recorded absent, as diffusers' docs load SD3 without T5: text_encoder_3=None, tokenizer_3=None
        index = s.out / "pipeline" / "model_index.json"
        index.write_text(
            json.dumps(
                {**json.loads(index.read_text()), "text_encoder_3": [None, None], "tokenizer_3": [None, None]},
                indent=2,
                sort_keys=True,
            )
            + "\n"
        )
    print(f"pipeline saved to {s.out / 'pipeline'} after {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
