"""Train ``tiny-shapes`` CLIP: image and text towers that agree on the shapes world, for the CLIP scorers.

    python -m scorers.shapes_clip --out outputs/shapes-clip    # about ten minutes on 2 CPU cores

CLIP's symmetric contrastive loss (Radford et al. 2021) over a batch of captioned renders, with one hard
negative caption per image (a colour, shape, count or relation changed) among the texts, so the score
depends on what the verifier checks rather than on the bag of words alone. The captions are the whole
grammar's (a reward model knows more than the generator was taught). An aesthetic-style MLP on the image
embedding is fitted after, to the quality of degraded renders (1 = a clean render; blur and noise lower it),
so ``--model aesthetic --checkpoint tiny-shapes`` scores image quality without a prompt, as LAION's does.

Seeded and resumable like trainer/tools/shapes_model.py; the result (``out/clip``, fp16 safetensors, with its
processor and ``aesthetic-mlp.safetensors``) ships as ``scorers/weights/tiny-shapes-clip``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from scorers import world

SPEC = {"hidden": 64, "layers": 3, "heads": 4, "patch": 8, "projection": 64}
ALL = [c for captions in world.CAPTIONS.values() for c in captions]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(cli_parse_args=False, cli_kebab_case=True, cli_implicit_flags=True)

    out: Path = Field(Path("outputs/shapes-clip"), description="checkpoints and the finished model")
    seed: int = 0
    steps: int = Field(2500, ge=0)
    batch: int = Field(64, gt=1)
    lr: float = 5e-4
    mlp_steps: int = Field(1500, ge=0)
    save_every: int = Field(500, gt=0)
    threads: int = Field(0, ge=0)


def hard_negative(caption: str, rng: np.random.Generator) -> str:
    """``caption`` with one claim changed: a colour, a shape, a count or a relation."""
    words = caption.split()
    swaps = [
        (i, group)
        for i, w in enumerate(words)
        for group in (
            list(world.COLORS),
            list(world.SHAPES),
            [s + "s" for s in world.SHAPES],
            list(world.NUMBERS),
            ["left", "right"],
            ["above", "below"],
        )
        if w in group
    ]
    i, group = swaps[rng.integers(len(swaps))]
    words[i] = [w for w in group if w != words[i]][rng.integers(len(group) - 1)]
    return " ".join(words)


def build(seed: int):
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from scorers.tiny_models import clip_tokenizer

    words = sorted({w for c in ALL for w in c.split()})
    tokenizer = clip_tokenizer(words)
    common = {
        "hidden_size": SPEC["hidden"],
        "intermediate_size": 2 * SPEC["hidden"],
        "num_hidden_layers": SPEC["layers"],
        "num_attention_heads": SPEC["heads"],
    }
    config = CLIPConfig(
        text_config={
            **common,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**common, "image_size": world.RESOLUTION, "patch_size": SPEC["patch"]},
        projection_dim=SPEC["projection"],
    )
    torch.manual_seed(seed)
    size = world.RESOLUTION
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer,
    )
    return CLIPModel(config), processor


def degraded(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Renders and their quality: 1 minus the strength of a blur and noise applied (0 to 1)."""
    from PIL import Image, ImageFilter

    images, quality = [], rng.uniform(0, 1, n)
    for q in quality:
        caption, _ = world.sample_caption(rng, "train")
        image = Image.fromarray(world.render(caption, rng)).filter(ImageFilter.GaussianBlur(float(2.5 * (1 - q))))
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(
            0, 60 * (1 - q), (world.RESOLUTION, world.RESOLUTION, 3)
        )
        images.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return np.stack(images), quality


def main(argv: list[str] | None = None) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    s = CliApp.run(Settings, cli_args=argv)
    if s.threads:
        torch.set_num_threads(s.threads)
    s.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, processor = build(s.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.1)
    ckpt, step = s.out / "checkpoint", 0
    if (ckpt / "state.json").exists():
        model.load_state_dict(load_file(ckpt / "model.safetensors"))
        step = json.loads((ckpt / "state.json").read_text())["step"]
    # a fresh AdamW on resume: its moments re-warm in a few steps under the warm-up below
    model.train()
    with tqdm(total=s.steps, initial=step, desc="clip") as bar:
        while step < s.steps:
            rng = np.random.default_rng([s.seed, 1, step])
            caps = [ALL[i] for i in rng.integers(len(ALL), size=s.batch)]
            images = np.stack([world.render(c, rng) for c in caps])
            texts = caps + [hard_negative(c, rng) for c in caps]  # image i's negatives: every text but caps[i]
            inputs = processor(text=texts, images=list(images), padding=True, return_tensors="pt")
            out = model(**inputs)
            logits = out.logits_per_image  # (batch, 2 x batch)
            target = torch.arange(s.batch)
            # a caption twice in the batch is no negative of itself (the mask is symmetric)
            repeated = torch.tensor([[a == b and i != j for j, b in enumerate(caps)] for i, a in enumerate(caps)])
            positives = logits[:, : s.batch].masked_fill(repeated, -1e4)
            text_logits, image_logits = positives.t(), torch.cat([positives, logits[:, s.batch :]], 1)
            loss = (
                torch.nn.functional.cross_entropy(image_logits, target)
                + torch.nn.functional.cross_entropy(text_logits, target)
            ) / 2
            for group in optimizer.param_groups:
                group["lr"] = s.lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * (1 - step / s.steps))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % s.save_every == 0 or step == s.steps:
                ckpt.mkdir(exist_ok=True)
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt / "model.safetensors")
                (ckpt / "state.json").write_text(json.dumps({"step": step}))
    model.eval().requires_grad_(False)
    folder = s.out / "clip"
    model.half().save_pretrained(folder)
    processor.save_pretrained(folder)
    model.float()

    from scorers.aesthetic_mlp import AestheticMLP

    torch.manual_seed(s.seed)
    mlp = AestheticMLP(SPEC["projection"])
    mlp_optimizer = torch.optim.AdamW(mlp.parameters(), lr=1e-3)
    for step in tqdm(range(s.mlp_steps), desc="aesthetic mlp"):
        images, quality = degraded(np.random.default_rng([s.seed, 2, step]), 64)
        with torch.no_grad():
            emb = model.get_image_features(**processor(images=list(images), return_tensors="pt"))
            emb = getattr(emb, "pooler_output", emb)
            emb = emb / emb.norm(dim=-1, keepdim=True)
        loss = torch.nn.functional.mse_loss(mlp(emb).squeeze(-1), torch.as_tensor(quality, dtype=torch.float32))
        mlp_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mlp_optimizer.step()
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, folder / "aesthetic-mlp.safetensors")
    print(f"CLIP saved to {folder} after {time.perf_counter() - start:.0f} s (aesthetic MLP loss {loss.item():.4f})")


if __name__ == "__main__":
    main()
