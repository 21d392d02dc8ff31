"""Every scorer served for real takes any image shape the protocol allows (1 pixel a side up to extreme aspect
ratios) without a 5xx; the image processors are told the channel layout instead of guessing it; prompts past
a scorer's limit are a 413 naming the prompt, and OCR's edit distance runs at C speed."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from protocol import MEDIA_TYPE, build_request, unpack

pytestmark = pytest.mark.timeout(600)

# (height, width): 1..4 pixels a side, and aspect ratios from 1:3000 to 1:1048576 (the 1 Mpixel limit)
SHAPES = [(1, 1), (1, 3), (3, 1), (2, 2), (1, 2000), (3, 20), (4, 20), (20, 4), (2000, 1), (1, 3000), (3000, 1)]
SHAPES += [(2, 2000), (7, 5000), (1, 1024 * 1024)]

# Every built-in scorer that runs on a tiny model (hpsv2 and imagereward need weight files: their images go
# through the same CLIP preprocessing as clipscore's).
SCORERS = {
    "compression": ([], "a photo of a dog"),
    "synthetic": ([], "a photo of a dog"),
    "shapes": ([], "a red circle"),
    "aesthetic": (["--checkpoint", "tiny"], "a photo of a dog"),
    "clipscore": (["--checkpoint", "tiny"], "a photo of a dog"),
    "pickscore": (["--checkpoint", "tiny"], "a photo of a dog"),
    # a small test scale, as fast as the tiny model: 1 x 3000 still scales its short side to 0.03 pixels
    "geneval": (["--checkpoint", "tiny", "--options", "resize=64", "--options", "max_size=96"], "a photo of a dog"),
    "ocr": (["--checkpoint", "tiny", "--options", "max_new_tokens=2"], 'a sign that says "OPEN"'),
}


def post(url: str, images: list[np.ndarray], prompts: list[str]) -> httpx.Response:
    body = build_request(images, prompts)
    return httpx.post(f"{url}/v1/score", content=body, headers={"content-type": MEDIA_TYPE}, timeout=120)


@pytest.mark.parametrize("model", list(SCORERS))
def test_no_image_shape_is_a_server_error(start_server, model):
    args, prompt = SCORERS[model]
    server = start_server("--model", model, *args)
    rng = np.random.default_rng(0)
    refused = {}
    for h, w in SHAPES:
        reply = post(server.url, [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)], [prompt])
        assert reply.status_code < 500, (h, w, reply.content[:300])
        if reply.status_code == 200:
            assert np.isfinite(unpack(reply.content)["scores"]).all()
        else:
            refused[h, w] = (reply.status_code, unpack(reply.content)["error"])
    # JPEG cannot encode a side over 65,500 pixels: the scorer says so (Scorer.max_side), every other takes all
    expected = {}
    if model == "compression":
        message = "1x1048576 pixels; scorer compression takes sides of at most 65500"
        expected[1, 1024 * 1024] = (422, {"code": "invalid_request", "message": message, "field": "images.0"})
    assert refused == expected
    assert server.healthy()


def test_ocr_takes_images_one_pixel_high_with_the_trocr_reader(start_server, tmp_path):
    from scorers import tiny_models

    (tmp_path / "ocr").mkdir()
    tiny_models.build_ocr(tmp_path / "ocr")
    server = start_server("--model", "ocr", "--checkpoint", str(tmp_path / "ocr"), "--options", "max_new_tokens=2")
    for width in (1, 3, 2000):
        reply = post(server.url, [np.full((1, width, 3), 200, np.uint8)], ['a sign that says "OPEN"'])
        assert reply.status_code == 200, reply.content[:300]
        assert 0 <= unpack(reply.content)["scores"][0] <= 1


@pytest.mark.parametrize("height", [1, 3, 4])
def test_colour_crops_are_read_channels_last(height):
    """A crop 1, 3 or 4 pixels high embeds as the same crop handed over as a PIL image (whose layout is
    unambiguous): not as its transpose."""
    import torch
    from PIL import Image

    from scorers.clip import ClipEmbedder, features

    clip = ClipEmbedder("tiny")
    clip.load("cpu")
    crop = np.zeros((height, 20, 3), np.uint8)
    crop[..., 0] = 255  # all red
    pixels = clip.processor(images=[Image.fromarray(crop)], return_tensors="pt")["pixel_values"]
    mean, std = clip.processor.image_processor.image_mean, clip.processor.image_processor.image_std
    red = [(1 - mean[0]) / std[0], -mean[1] / std[1], -mean[2] / std[2]]
    assert pixels[0, :, 0, 0].tolist() == pytest.approx(red, abs=1e-5)
    with torch.inference_mode():
        expected = features(clip.model.get_image_features(pixel_values=pixels)).float()
    expected = expected / expected.norm(dim=-1, keepdim=True)
    assert clip.images(crop[None]).numpy() == pytest.approx(expected.numpy(), abs=1e-5)


def test_prompts_past_a_scorers_limit_are_413_and_the_server_goes_on(start_server):
    server = start_server("--model", "ocr", "--checkpoint", "tiny", "--options", "max_new_tokens=2")
    image = [np.zeros((32, 32, 3), np.uint8)]
    long = f'a sign that says "{"x" * 1000}"'  # 1019 characters: over OCR's 1000
    reply = post(server.url, image, [long])
    assert reply.status_code == 413
    error = unpack(reply.content)["error"]
    assert error["field"] == "prompts.0"
    assert error["message"] == "1019 characters; scorer ocr takes prompts of at most 1000"
    start = time.perf_counter()
    assert post(server.url, image, [f'a sign that says "{"x" * 980}"']).status_code == 200
    assert time.perf_counter() - start < 10
    assert server.healthy()


def test_the_edit_distance_is_fast_on_long_texts():
    from scorers.ocr import levenshtein, reward

    start = time.perf_counter()
    assert levenshtein("ab" * 2500, "ba" * 2500) == 2
    assert levenshtein("a" * 5000, "b" * 5000) == 5000
    assert reward("x" * 5000, "y" * 1000) == 0.0
    assert time.perf_counter() - start < 0.5  # the pure-Python table took about 10 s


def test_clip_preprocessing_cuts_extreme_aspect_ratios_to_their_centre_first():
    """CLIP's processor resizes the shorter side first: a 1 x 1,048,576 image took 29 s at the tiny model's 32
    pixels (at CLIP-L's 224 it would need 150 GB); its centre 1 x 4 gives the same embedding at once."""
    from scorers.clip import ClipEmbedder

    clip = ClipEmbedder("tiny")
    clip.load("cpu")
    line = np.random.default_rng(1).integers(0, 256, (1, 1, 1024 * 1024, 3), dtype=np.uint8)
    start = time.perf_counter()
    embedded = clip.images(line).numpy()
    assert time.perf_counter() - start < 5
    middle = 1024 * 1024 // 2
    assert embedded == pytest.approx(clip.images(line[:, :, middle - 2 : middle + 2]).numpy(), abs=1e-6)
    from scorers.scorer import central

    assert central(line[0, :, :4]).shape == (1, 4, 3) and central(line[0, :, :5]).shape == (1, 4, 3)
