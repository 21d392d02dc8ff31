"""The OCR reward: Flow-GRPO's rule on hand-made readings, and the scorer served for real on a tiny random-init
TrOCR-style reader, against what the model reads when run here directly with transformers."""

from __future__ import annotations

import httpx
import pytest
import numpy as np
from transformers import AutoModelForImageTextToText, AutoProcessor, VisionEncoderDecoderModel

from protocol import MEDIA_TYPE, RewardClient, build_request, unpack
from scorers import tiny_models
from scorers.ocr import levenshtein, reward, target

pytestmark = pytest.mark.timeout(300)


def test_levenshtein():
    assert [
        levenshtein(a, b)
        for a, b in [("kitten", "sitting"), ("", "abc"), ("abc", ""), ("flaw", "lawn"), ("same", "same")]
    ] == [3, 3, 3, 2, 0]


@pytest.mark.parametrize(
    "read, wanted, expected",
    [
        ("Hello World", "hello world", 1.0),  # case and spaces do not count
        ("GRAND OPENING: Hello World!!", "hello world", 1.0),  # the target inside what was read
        ("helo world", "hello world", 0.9),  # one edit over 10 letters
        ("hello", "hello world", 0.5),  # five missing letters
        ("", "sale", 0.0),
        ("an entirely different and much longer text", "sale", 0.0),  # capped at the target's length, not below 0
    ],
)
def test_reward_is_one_minus_the_normalised_edit_distance(read, wanted, expected):
    assert reward(read, wanted) == pytest.approx(expected)


def test_the_target_is_the_first_quoted_text():
    assert target('A neon sign reading "Open 24 Hours" above a door, and "no" below') == "Open 24 Hours"
    for prompt in ["a sign with no quotes", 'an unclosed "quote', 'empty "  " quotes']:
        with pytest.raises(ValueError, match="has no text in double quotes"):
            target(prompt)


@pytest.mark.parametrize("build", [tiny_models.build_ocr, tiny_models.build_got_ocr], ids=["trocr", "got-ocr2"])
def test_served_ocr_reads_like_the_model_run_here(start_server, tmp_path, build):
    folder = tmp_path / "ocr"
    folder.mkdir()
    build(folder)
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 60, 3), dtype=np.uint8)
    cls = VisionEncoderDecoderModel if build is tiny_models.build_ocr else AutoModelForImageTextToText
    model, processor = cls.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    inputs = processor(images=list(images), return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    if cls is AutoModelForImageTextToText:  # the answer follows the prompt
        out = out[:, inputs["input_ids"].shape[1] :]
    read = [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]
    first, second = read[0].split()
    prompts = [
        f'a shop sign that says "{first}"',
        f'a poster reading "{first} {second[:-1]}x"',
        'a mug with "zz" on it',
    ]
    server = start_server("--model", "ocr", "--checkpoint", str(folder), "--max-new-tokens", "2")
    with RewardClient(server.url) as client:
        reply = client.submit(images, prompts).result(timeout=120)
    assert reply.info["read"] == read and reply.info["target"] == [first, f"{first} {second[:-1]}x", "zz"]
    letters = len(first + second)
    assert reply.scores == pytest.approx([1.0, 1 - 1 / letters, 0.0])  # inside; one edit; nothing alike
    bad = httpx.post(
        f"{server.url}/v1/score",
        content=build_request(images[:1], ["no quotes here"]),
        headers={"content-type": MEDIA_TYPE},
        timeout=30,
    )
    error = unpack(bad.content)["error"]
    assert (bad.status_code, error["field"]) == (422, "prompts.0") and "no text in double quotes" in error["message"]
    with RewardClient(server.url) as client:  # and it goes on serving
        assert client.submit(images[:1], prompts[:1]).result(timeout=120).scores == [1.0]


def test_the_ocr_prompts_quote_training_texts_never_the_evaluations():
    from trainer.prompts import ASSETS, make_prompt_fn

    draw, rng = make_prompt_fn("ocr"), np.random.default_rng(0)
    drawn = [draw(rng)[0] for _ in range(500)]
    texts = set((ASSETS / "ocr" / "train_texts.txt").read_text().splitlines())
    evaluation = (ASSETS / "ocr" / "flow_grpo_test.txt").read_text().splitlines()
    assert len(evaluation) == 1018 and {target(p).lower() for p in evaluation}.isdisjoint(t.lower() for t in texts)
    assert {target(p) for p in drawn} == texts and len(set(drawn)) > 400
