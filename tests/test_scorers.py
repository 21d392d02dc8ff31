"""Model-backed scorers served for real, on tiny random-init checkpoints saved to a temp dir.

Each expected value is computed here, directly with transformers, independently of the scorers' code.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoProcessor, AutoTokenizer, CLIPModel, LlavaForConditionalGeneration

from protocol import MEDIA_TYPE, RewardClient, build_request, unpack
from scorers import tiny_models

pytestmark = pytest.mark.timeout(300)
PROMPTS = ["a cat", "a dog riding a bike", "red fish", "an owl"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    for kind, build in [
        ("clip", tiny_models.build_clip),
        ("llava", tiny_models.build_llava),
        ("bert", tiny_models.build_bert),
    ]:
        (root / kind).mkdir()
        build(root / kind)
    tiny_models.build_aesthetic_mlp(root / "mlp.safetensors", tiny_models.CLIP_SPEC["projection"])
    from safetensors.torch import load_file

    torch.save(load_file(root / "mlp.safetensors"), root / "mlp.pth")  # the published file is a .pth state dict
    return root


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (len(PROMPTS), 40, 40, 3), dtype=np.uint8)


def clip_embeddings(folder, images, prompts):
    model, processor = CLIPModel.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    with torch.no_grad():
        img = model.get_image_features(**processor(images=list(images), return_tensors="pt"))
        txt = model.get_text_features(**processor(text=prompts, padding=True, return_tensors="pt"))
    img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))
    return img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True), model


def score(server, images, prompts, metadata=None):
    with RewardClient(server.url) as client:
        return client.submit(images, prompts, metadata).result(timeout=120)


@pytest.mark.parametrize("weights", ["mlp.pth", "mlp.safetensors"])
def test_aesthetic_is_the_mlp_of_the_normalised_clip_embedding(start_server, checkpoints, images, weights):
    server = start_server(
        "--model", "aesthetic", "--checkpoint", str(checkpoints / "clip"), "--weights", str(checkpoints / weights)
    )
    reply = score(server, images, PROMPTS)
    img, _, _ = clip_embeddings(checkpoints / "clip", images, PROMPTS)
    state = torch.load(checkpoints / "mlp.pth", weights_only=True)
    x = img
    for i in (0, 2, 4, 6, 7):  # linear layers, no activations (dropout is off at inference)
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    assert reply.scores == pytest.approx(x.squeeze(-1).tolist(), abs=1e-5)
    assert len(set(reply.scores)) == len(PROMPTS)


def test_clipscore_and_pickscore(start_server, checkpoints, images):
    img, txt, model = clip_embeddings(checkpoints / "clip", images, PROMPTS)
    cosine = (img * txt).sum(-1)
    clip = start_server("--model", "clipscore", "--checkpoint", str(checkpoints / "clip"))
    reply = score(clip, images, PROMPTS)
    assert reply.info["cosine"] == pytest.approx(cosine.tolist(), abs=1e-5)
    assert reply.scores == pytest.approx((100 * cosine).clamp(min=0).tolist(), abs=1e-3)
    pick = start_server(
        "--model", "pickscore", "--checkpoint", str(checkpoints / "clip"), "--processor", str(checkpoints / "clip")
    )
    reply = score(pick, images, PROMPTS)
    expected = model.logit_scale.exp().item() * cosine
    assert reply.scores == pytest.approx(expected.tolist(), abs=1e-4)


def llava_answer(folder, image, question, max_new_tokens):
    model, processor = LlavaForConditionalGeneration.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    inputs = processor(images=[image], text=[f"USER: <image>\n{question} ASSISTANT:"], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()


def bertscore_recall(folder, candidate: str, reference: str) -> float:
    """Greedy matching written out token by token: each reference token's best cosine over the answer."""
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder)

    def embed(text):
        ids = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**ids, output_hidden_states=True).hidden_states[-1][0]
        keep = [i for i, t in enumerate(ids.input_ids[0].tolist()) if t not in tokenizer.all_special_ids]
        vectors = hidden[keep]
        return vectors / vectors.norm(dim=-1, keepdim=True)

    cand, ref = embed(candidate), embed(reference)
    if len(cand) == 0:
        return 0.0
    return float(np.mean([max(float(r @ c) for c in cand) for r in ref]))


def test_llava_bertscore(start_server, checkpoints, images):
    server = start_server(
        "--model",
        "llava",
        "--checkpoint",
        str(checkpoints / "llava"),
        "--bertscore-model",
        str(checkpoints / "bert"),
        "--max-new-tokens",
        "6",
    )
    reply = score(server, images, PROMPTS)
    question = "Answer concisely: what is going on in this image?"
    for i, prompt in enumerate(PROMPTS):
        answer = llava_answer(checkpoints / "llava", images[i], question, 6)
        assert reply.info["answer"][i] == answer
        expected = bertscore_recall(checkpoints / "bert", answer, f"The image contains {prompt}")
        assert reply.scores[i] == pytest.approx(expected, abs=1e-4)
        assert reply.info["recall"][i] == pytest.approx(reply.scores[i])
        p, r = reply.info["precision"][i], reply.info["recall"][i]
        assert reply.info["f1"][i] == pytest.approx(2 * p * r / (p + r), abs=1e-6)


def test_llava_strict(start_server, checkpoints, images):
    server = start_server(
        "--model", "llava", "--mode", "strict", "--checkpoint", str(checkpoints / "llava"), "--max-new-tokens", "5"
    )
    questions = ["is this a cat ?", "what color is it ?"]
    direct = [[llava_answer(checkpoints / "llava", images[i], q, 5) for q in questions] for i in range(2)]
    # expected answers: a word the model does say, and one it does not
    metadata = [
        {"questions": questions, "answers": [d[0].split()[0] if d[0] else "x", "zebra-not-said"]} for d in direct
    ]
    reply = score(server, images[:2], PROMPTS[:2], metadata)
    assert reply.info["answers"] == direct
    expected = [np.mean([a.lower() in r.lower() for a, r in zip(m["answers"], d)]) for m, d in zip(metadata, direct)]
    assert reply.scores == pytest.approx(expected) and reply.scores == pytest.approx([0.5, 0.5])

    body = build_request(images[:2], PROMPTS[:2], [metadata[0], {"questions": ["q"]}])
    bad = httpx.post(f"{server.url}/v1/score", content=body, headers={"content-type": MEDIA_TYPE})
    assert bad.status_code == 422 and unpack(bad.content)["error"]["field"] == "metadata.1"
    assert server.healthy()

    # Metadata that would break the processor for the whole batch is refused on its own, before batching.
    breaking = [
        (
            {"questions": ["what is <image> here?"], "answers": ["x"]},
            "metadata.1.questions.0",
            "must not contain '<image>'",
        ),
        ({"questions": ["q"] * 9, "answers": ["a"] * 9}, "metadata.1.questions", "at most 8 per image"),
        ({"questions": [3], "answers": ["a"]}, "metadata.1.questions.0", "must be strings"),
    ]
    for meta, field, message in breaking:
        body = build_request(images[:2], PROMPTS[:2], [metadata[0], meta])
        bad = httpx.post(f"{server.url}/v1/score", content=body, headers={"content-type": MEDIA_TYPE})
        error = unpack(bad.content)["error"]
        assert (bad.status_code, error["field"]) == (422, field) and message in error["message"], error
    assert score(server, images[:2], PROMPTS[:2], metadata).scores == pytest.approx([0.5, 0.5])
