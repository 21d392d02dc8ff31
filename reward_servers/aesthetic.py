"""The LAION improved aesthetic predictor: an MLP on the L2-normalised CLIP ViT-L/14 image embedding."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from reward_servers.clip import ClipEmbedder
from reward_servers.scorer import ScoreOutput, Scorer


class AestheticMLP(nn.Module):
    """768 -> 1024 -> 128 -> 64 -> 16 -> 1, linear layers with dropout and no activations; the published
    weights (sac+logos+ava1-l14-linearMSE.pth) have keys layers.0/2/4/6/7.weight and .bias."""

    def __init__(self, in_features: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


def load_state_dict(path: str):
    """A .safetensors file, or a torch checkpoint read with weights_only (no pickle code runs)."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # Checkpoints saved from a wrapper module carry a prefix; the layout is what matters.
    return {key.removeprefix("module.").removeprefix("model."): value for key, value in state.items()}


class AestheticScorer(Scorer):
    name = "aesthetic"
    description = "LAION improved aesthetic score (about 1-10) of the CLIP ViT-L/14 image embedding"

    def __init__(self, checkpoint: str = "openai/clip-vit-large-patch14", weights: str | None = None):
        self.clip = ClipEmbedder(checkpoint)
        self.weights = weights

    def requirements(self) -> dict[str, tuple[str, str | None, str]]:
        needs = self.clip.requirements()
        if self.clip.checkpoint not in ("tiny", "tiny-shapes"):  # the tiny CLIPs come with their MLP weights
            needs["weights"] = ("file", self.weights, "the LAION MLP, sac+logos+ava1-l14-linearMSE.pth or .safetensors")
        return needs

    def load(self, device: str = "cpu") -> None:
        if self.weights is None:
            if self.clip.checkpoint == "tiny":
                self.weights = str(self._tiny_weights())
            elif self.clip.checkpoint == "tiny-shapes":
                from reward_servers.tiny_models import resolve

                self.weights = str(Path(resolve("tiny-shapes", "clip")) / "aesthetic-mlp.safetensors")
            else:
                raise ValueError("--weights is required: the path of sac+logos+ava1-l14-linearMSE.pth (or .safetensors)")
        if not Path(self.weights).is_file():
            raise FileNotFoundError(f"--weights {self.weights}: no such file")
        self.clip.load(device)
        state = load_state_dict(self.weights)
        self.mlp = AestheticMLP(state["layers.0.weight"].shape[1])
        self.mlp.load_state_dict(state)
        self.mlp.to(device).eval()

    def score(self, images, prompts, metadata) -> ScoreOutput:
        embeddings = self.clip.images(images)
        with self.clip.torch.inference_mode():
            return ScoreOutput(self._head(embeddings).cpu().double().numpy())

    def score_tensor(self, images, prompts: list[str] | None = None, metadata=None):
        """Differentiable scores (N,) of float images (N, 3, H, W) in [0, 1] (the prompts are not used)."""
        return self._head(self.clip.embed(self.clip.pixels(images)))

    def _head(self, embeddings):
        return self.mlp(embeddings.to(next(self.mlp.parameters()).dtype)).squeeze(-1).float()

    def _tiny_weights(self) -> Path:
        from reward_servers.tiny_models import build_aesthetic_mlp, cached_build, CLIP_SPEC

        folder = cached_build(
            "tiny-aesthetic-mlp", {"in": CLIP_SPEC["projection"]},
            lambda f: build_aesthetic_mlp(f / "mlp.safetensors", CLIP_SPEC["projection"]),
        )
        return folder / "mlp.safetensors"
