"""Reward models loaded from their published weight files (HPSv2, ImageReward), served for real, checked
against independent plain-torch implementations of the published architectures, random-init and tiny.

The reference modules below are written from the papers' and projects' descriptions of the networks, with
parameter names as the published checkpoints have them, so their state dicts are what a user downloads.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from protocol import RewardClient
from scorers import tiny_models

pytestmark = pytest.mark.timeout(300)
PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a red circle"]
WIDTH, HEADS, LAYERS, IMAGE, PATCH, EMBED = 32, 4, 2, 32, 8, 16


class OpenClipBlock(nn.Module):
    """OpenCLIP's residual attention block: pre-LayerNorm, fused-qkv attention, GELU MLP of 4x width."""

    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(WIDTH, 4 * WIDTH), gelu=nn.GELU(), c_proj=nn.Linear(4 * WIDTH, WIDTH))
        )

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class OpenClipTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.resblocks = nn.ModuleList(OpenClipBlock() for _ in range(LAYERS))

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class OpenClipVisual(nn.Module):
    def __init__(self):
        super().__init__()
        grid = IMAGE // PATCH
        self.conv1 = nn.Conv2d(3, WIDTH, PATCH, PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(WIDTH) * 0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, WIDTH) * 0.5)
        self.ln_pre, self.ln_post = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.transformer = OpenClipTransformer()
        self.proj = nn.Parameter(torch.randn(WIDTH, EMBED) * WIDTH**-0.5)

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(len(x), 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class OpenClip(nn.Module):
    """CLIP as OpenCLIP builds ViT-H-14 (Radford et al. 2021's architecture, GELU): the text feature is the
    final LayerNorm at the end-of-text token (the largest id), projected."""

    def __init__(self, vocab: int):
        super().__init__()
        self.visual = OpenClipVisual()
        self.token_embedding = nn.Embedding(vocab, WIDTH)
        self.positional_embedding = nn.Parameter(torch.randn(77, WIDTH) * 0.1)
        self.transformer = OpenClipTransformer()
        self.ln_final = nn.LayerNorm(WIDTH)
        self.text_projection = nn.Parameter(torch.randn(WIDTH, EMBED) * WIDTH**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))

    def encode_text(self, ids, eot_positions):
        n = ids.shape[1]
        causal = torch.full((n, n), float("-inf")).triu(1)
        x = self.ln_final(self.transformer(self.token_embedding(ids) + self.positional_embedding[:n], causal))
        return x[torch.arange(len(ids)), eot_positions] @ self.text_projection


def randomised(module: nn.Module) -> nn.Module:
    """LayerNorms away from their (1, 0) init, so that swapping two of them in a conversion shows."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
    return module.eval()


def normalised(x):
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def hps(tmp_path_factory):
    """A ViT-H-14-shaped architecture folder (transformers config + processor) and an HPS weights file."""
    root = tmp_path_factory.mktemp("hps")
    spec = {
        **tiny_models.CLIP_SPEC,
        "hidden": WIDTH,
        "heads": HEADS,
        "layers": LAYERS,
        "image_size": IMAGE,
        "patch": PATCH,
        "projection": EMBED,
        "intermediate": 4 * WIDTH,
    }
    tiny_models.build_clip(root / "arch", spec)
    config = json.loads((root / "arch" / "config.json").read_text())
    for tower in ("text_config", "vision_config"):
        config[tower]["hidden_act"] = "gelu"  # ViT-H-14's, where OpenAI's CLIPs use quick_gelu
    (root / "arch" / "config.json").write_text(json.dumps(config))
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(root / "arch")
    torch.manual_seed(3)
    reference = randomised(OpenClip(len(processor.tokenizer)))
    # the published file: a training checkpoint of a DistributedDataParallel module, its weights under "state_dict"
    torch.save(
        {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, root / "HPS_v2.1.pt"
    )
    return root, reference, processor


def hps_reference(reference, processor, pixels, prompts):
    """HPSv2's score: image features @ text features, both L2-normalised; ``pixels`` (N, 3, H, W) in [0, 1]."""
    proc = processor.image_processor
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (proc.image_mean, proc.image_std))
    tokens = processor.tokenizer(prompts, padding=True, return_tensors="pt")
    eot = (tokens["input_ids"] == processor.tokenizer.eos_token_id).int().argmax(-1)
    with torch.no_grad():
        text = normalised(reference.encode_text(tokens["input_ids"], eot))
    return (normalised(reference.visual((pixels - mean) / std)) * text).sum(-1)


def test_hpsv2_served_equals_the_openclip_reference(start_server, hps):
    root, reference, processor = hps
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (len(PROMPTS), IMAGE, IMAGE, 3), dtype=np.uint8)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).requires_grad_()
    expected = hps_reference(reference, processor, pixels, PROMPTS)
    (expected_grad,) = torch.autograd.grad(expected.sum(), pixels)
    expected_grad = expected_grad.permute(0, 2, 3, 1).numpy()

    server = start_server(
        "--model", "hpsv2", "--checkpoint", str(root / "arch"), "--weights", str(root / "HPS_v2.1.pt")
    )
    with RewardClient(server.url) as client:
        reply = client.submit(images, PROMPTS).result(timeout=60)
        grad_reply, gradients = client.submit_grad(images / 255.0, PROMPTS).result(timeout=60)
    np.testing.assert_allclose(reply.scores, expected.detach().numpy(), atol=1e-5)
    assert np.ptp(reply.scores) > 1e-3  # random weights still tell the images apart: the check has teeth
    np.testing.assert_allclose(grad_reply.scores, expected.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(gradients, expected_grad, atol=1e-6 * np.abs(expected_grad).max() * 10, rtol=1e-4)
    assert httpx.get(f"{server.url}/v1/info").json()["differentiable"] is True


def test_hpsv2_without_weights_is_refused_before_loading():
    from scorers.hub import problem
    from scorers.scorer import create_scorer

    needs = create_scorer("hpsv2", checkpoint="tiny").requirements()
    assert problem(*needs["weights"]) == "required (HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt))"


# ImageReward: BLIP's ViT (timm's block layout, LayerNorm eps 1e-6) and BLIP's BERT with cross-attention
# (post-LayerNorm, eps 1e-12), the [CLS] feature through the MLP, standardised.
VIT_WIDTH, VIT_HEADS, TEXT_WIDTH, TEXT_HEADS, TEXT_LAYERS = 128, 2, 32, 4, 2


def attend(q, k, v, heads, mask=None):
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    weights = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        weights = weights.masked_fill(~mask[:, None, None, :], float("-inf"))
    return (weights.softmax(-1) @ v).transpose(1, 2).flatten(2)


class VitBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(VIT_WIDTH, eps=1e-6), nn.LayerNorm(VIT_WIDTH, eps=1e-6)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(VIT_WIDTH, 3 * VIT_WIDTH), "proj": nn.Linear(VIT_WIDTH, VIT_WIDTH)})
        self.mlp = nn.ModuleDict(
            {"fc1": nn.Linear(VIT_WIDTH, 4 * VIT_WIDTH), "fc2": nn.Linear(4 * VIT_WIDTH, VIT_WIDTH)}
        )

    def forward(self, x):
        q, k, v = self.attn["qkv"](self.norm1(x)).chunk(3, dim=-1)
        x = x + self.attn["proj"](attend(q, k, v, VIT_HEADS))
        return x + self.mlp["fc2"](nn.functional.gelu(self.mlp["fc1"](self.norm2(x))))


class BlipVit(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.ModuleDict({"proj": nn.Conv2d(3, VIT_WIDTH, PATCH, PATCH)})
        self.cls_token = nn.Parameter(torch.randn(1, 1, VIT_WIDTH) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, (IMAGE // PATCH) ** 2 + 1, VIT_WIDTH) * 0.5)
        self.blocks = nn.ModuleList(VitBlock() for _ in range(2))
        self.norm = nn.LayerNorm(VIT_WIDTH, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed["proj"](x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def bert_attention(kv_width):
    return nn.ModuleDict(
        {
            "self": nn.ModuleDict(
                {
                    "query": nn.Linear(TEXT_WIDTH, TEXT_WIDTH),
                    "key": nn.Linear(kv_width, TEXT_WIDTH),
                    "value": nn.Linear(kv_width, TEXT_WIDTH),
                }
            ),
            "output": nn.ModuleDict(
                {"dense": nn.Linear(TEXT_WIDTH, TEXT_WIDTH), "LayerNorm": nn.LayerNorm(TEXT_WIDTH, eps=1e-12)}
            ),
        }
    )


def run_attention(module, x, context, mask=None):
    s = module["self"]
    out = attend(s["query"](x), s["key"](context), s["value"](context), TEXT_HEADS, mask)
    return module["output"]["LayerNorm"](x + module["output"]["dense"](out))


class BertLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention, self.crossattention = bert_attention(TEXT_WIDTH), bert_attention(VIT_WIDTH)
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(TEXT_WIDTH, 2 * TEXT_WIDTH)})
        self.output = nn.ModuleDict(
            {"dense": nn.Linear(2 * TEXT_WIDTH, TEXT_WIDTH), "LayerNorm": nn.LayerNorm(TEXT_WIDTH, eps=1e-12)}
        )

    def forward(self, x, mask, image):
        x = run_attention(self.crossattention, run_attention(self.attention, x, x, mask), image)
        return self.output["LayerNorm"](x + self.output["dense"](nn.functional.gelu(self.intermediate["dense"](x))))


class BlipTextEncoder(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.embeddings = nn.ModuleDict(
            {
                "word_embeddings": nn.Embedding(vocab, TEXT_WIDTH),
                "position_embeddings": nn.Embedding(64, TEXT_WIDTH),
                "LayerNorm": nn.LayerNorm(TEXT_WIDTH, eps=1e-12),
            }
        )
        self.embeddings.register_buffer("position_ids", torch.arange(64)[None])  # BLIP's checkpoints carry it
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(BertLayer() for _ in range(TEXT_LAYERS))})

    def forward(self, ids, mask, image):
        e = self.embeddings
        x = e["LayerNorm"](e["word_embeddings"](ids) + e["position_embeddings"](torch.arange(ids.shape[1])))
        for layer in self.encoder["layer"]:
            x = layer(x, mask.bool(), image)
        return x


class ImageRewardReference(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.blip = nn.ModuleDict(
            {
                "visual_encoder": BlipVit(),
                "text_encoder": BlipTextEncoder(vocab),
                "vision_proj": nn.Linear(VIT_WIDTH, 8),
            }
        )  # unused by the reward
        self.mlp = nn.ModuleDict(
            {
                "layers": nn.Sequential(
                    nn.Linear(TEXT_WIDTH, 64),
                    nn.Dropout(0.2),
                    nn.Linear(64, 16),
                    nn.Dropout(0.2),
                    nn.Linear(16, 8),
                    nn.Dropout(0.1),
                    nn.Linear(8, 4),
                    nn.Linear(4, 1),
                )
            }
        )

    def forward(self, pixels, ids, mask):
        cls = self.blip["text_encoder"](ids, mask, self.blip["visual_encoder"](pixels))[:, 0]
        return ((self.mlp["layers"](cls) - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)


def test_imagereward_served_equals_the_blip_reference(start_server, tmp_path):
    from transformers import AutoTokenizer

    bert = tiny_models.tiny_checkpoint("bert")
    tokenizer = AutoTokenizer.from_pretrained(bert)
    torch.manual_seed(5)
    reference = randomised(ImageRewardReference(len(tokenizer)))
    torch.save(reference.state_dict(), tmp_path / "ImageReward.pt")
    med = {
        "vocab_size": len(tokenizer),
        "hidden_size": TEXT_WIDTH,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": TEXT_HEADS,
        "intermediate_size": 2 * TEXT_WIDTH,
        "max_position_embeddings": 64,
        "encoder_width": 768,
        "add_cross_attention": True,
    }  # as the published file, whose encoder_width BLIP overrides
    (tmp_path / "med_config.json").write_text(json.dumps(med))

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (len(PROMPTS), IMAGE, IMAGE, 3), dtype=np.uint8)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).requires_grad_()
    mean, std = (
        torch.tensor(v).view(1, 3, 1, 1)
        for v in ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    )
    text = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    expected = reference((pixels - mean) / std, text["input_ids"], text["attention_mask"])
    (expected_grad,) = torch.autograd.grad(expected.sum(), pixels)
    expected_grad = expected_grad.permute(0, 2, 3, 1).numpy()

    server = start_server(
        "--model",
        "imagereward",
        "--weights",
        str(tmp_path / "ImageReward.pt"),
        "--checkpoint",
        str(bert),
        "--options",
        f"med_config={tmp_path / 'med_config.json'}",
    )
    with RewardClient(server.url) as client:
        reply = client.submit(images, PROMPTS).result(timeout=60)
        grad_reply, gradients = client.submit_grad(images / 255.0, PROMPTS).result(timeout=60)
    np.testing.assert_allclose(reply.scores, expected.detach().numpy(), atol=1e-5)
    assert np.ptp(reply.scores) > 1e-3
    np.testing.assert_allclose(grad_reply.scores, expected.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(gradients, expected_grad, atol=1e-5 * np.abs(expected_grad).max(), rtol=1e-4)
