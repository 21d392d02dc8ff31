"""The LAION improved aesthetic predictor: an MLP (scorers/aesthetic_mlp.py) on the L2-normalised CLIP
ViT-L/14 image embedding."""

from __future__ import annotations

from pathlib import Path

from scorers.aesthetic_mlp import AestheticMLP
from scorers.clip import ClipEmbedder
from scorers.scorer import ScoreOutput, Scorer
from scorers.state_dict import load_state_dict


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
                from scorers.tiny_models import resolve

                self.weights = str(Path(resolve("tiny-shapes", "clip")) / "aesthetic-mlp.safetensors")
            else:
                raise ValueError(
                    "--weights is required: the path of sac+logos+ava1-l14-linearMSE.pth (or .safetensors)"
                )
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
        from scorers.tiny_models import build_aesthetic_mlp, cached_build, CLIP_SPEC

        folder = cached_build(
            "tiny-aesthetic-mlp",
            {"in": CLIP_SPEC["projection"]},
            lambda f: build_aesthetic_mlp(f / "mlp.safetensors", CLIP_SPEC["projection"]),
        )
        return folder / "mlp.safetensors"
