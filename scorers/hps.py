"""HPSv2 / HPSv2.1 (Wu et al. 2023, "Human Preference Score v2"): an OpenCLIP ViT-H-14 finetuned on human
preferences; the score is the cosine of its image and prompt embeddings (about 0.2-0.35 for typical images).

The published weights (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) are an OpenCLIP state dict
under "state_dict". OpenCLIP's ViT-H-14 is the architecture of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``,
whose transformers config and processor we use, so the weights are renamed into a transformers CLIPModel
(``open_clip_to_transformers``) and HPSv2 runs on the same ``ClipEmbedder`` as CLIP score and PickScore,
with its differentiable path. The ``hpsv2`` package itself is not needed (it pins pytest 7.2).

Preprocessing: HPSv2 resizes the longer side to 224 and pads; for square images (what diffusion models
make) that is the processor's resize and centre crop used here.
"""

from __future__ import annotations

from scorers.clip import ClipScore
from scorers.state_dict import load_state_dict

VIT_H_14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

# OpenCLIP's residual block names -> transformers' CLIPEncoderLayer names (attention handled apart).
_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def _blocks(state: dict, src: str, dst: str) -> dict:
    """One tower's residual blocks; nn.MultiheadAttention's fused in_proj split into q, k and v."""
    out = {}
    for key, value in state.items():
        if not key.startswith(src):
            continue
        index, _, rest = key[len(src) :].partition(".")
        prefix = f"{dst}.{index}."
        if rest.startswith("attn.in_proj_"):
            kind = rest.rsplit("_", 1)[1]  # weight or bias
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{prefix}self_attn.{name}_proj.{kind}"] = part
            continue
        module, _, param = rest.rpartition(".")
        out[prefix + f"{_BLOCK[module]}.{param}"] = value
    return out


def open_clip_to_transformers(state: dict) -> dict:
    """An OpenCLIP CLIP state dict (ViT image tower, default text tower) as transformers CLIPModel's."""
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DistributedDataParallel
    v, t = "vision_model", "text_model"
    out = {
        f"{v}.embeddings.class_embedding": state["visual.class_embedding"],
        f"{v}.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        f"{v}.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        f"{t}.embeddings.token_embedding.weight": state["token_embedding.weight"],
        f"{t}.embeddings.position_embedding.weight": state["positional_embedding"],
        # OpenCLIP multiplies by (width, dim) matrices, nn.Linear by their transpose
        "visual_projection.weight": state["visual.proj"].t().contiguous(),
        "text_projection.weight": (
            state["text_projection.weight"]
            if "text_projection.weight" in state
            else state["text_projection"].t().contiguous()
        ),
        "logit_scale": state["logit_scale"],
    }
    for src, dst in [
        ("visual.ln_pre", f"{v}.pre_layrnorm"),
        ("visual.ln_post", f"{v}.post_layernorm"),
        ("ln_final", f"{t}.final_layer_norm"),
    ]:
        for param in ("weight", "bias"):
            out[f"{dst}.{param}"] = state[f"{src}.{param}"]
    out.update(_blocks(state, "visual.transformer.resblocks.", f"{v}.encoder.layers"))
    out.update(_blocks(state, "transformer.resblocks.", f"{t}.encoder.layers"))
    return out


def load_hps_weights(path: str) -> dict:
    """The published file (a torch checkpoint with "state_dict", read with weights_only) or a .safetensors
    state dict in OpenCLIP's names, as transformers CLIPModel weights."""
    state = load_state_dict(path)
    return open_clip_to_transformers(state.get("state_dict", state))


class HPSv2(ClipScore):
    name = "hpsv2"
    description = "HPSv2: cosine(image, prompt) of the preference-finetuned OpenCLIP ViT-H-14, about 0.2-0.35"

    def __init__(self, weights: str | None = None, checkpoint: str = VIT_H_14):
        super().__init__(checkpoint)
        self.weights = weights

    def requirements(self) -> dict[str, tuple[str, str | None, str]]:
        return {
            **self.clip.requirements(),
            "weights": ("file", self.weights, "HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt)"),
        }

    def load(self, device: str = "cpu") -> None:
        self.clip.load(device, weights=load_hps_weights(self.weights))

    def head(self, cosine):
        return cosine
