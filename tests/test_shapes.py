"""The shapes world: its grammar, renderer and verifier, served for real."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from protocol import MEDIA_TYPE, RewardClient, build_request, unpack
from scorers import world
from scorers.shapes import ShapesVerifier, components, detect, verify
from trainer.prompts import ASSETS, make_prompt_fn


def test_the_verifier_is_right_on_1000_heldout_renders():
    rng = np.random.default_rng(123)
    wrong, categories = [], set()
    for _ in range(1000):
        caption, category = world.sample_caption(rng, "heldout")
        score, info = verify(world.render(caption, rng), world.claims(caption))
        categories.add(category)
        if score != 1.0:
            wrong.append((caption, info))
    assert categories == set(world.CATEGORIES)
    assert len(wrong) <= 10, wrong[:5]


def test_every_caption_parses_to_its_category_and_claims():
    for category, captions in world.CAPTIONS.items():
        for caption in captions:
            assert world.claims(caption)["category"] == category
    assert world.claims("a red circle left of a blue square") == {
        "category": "position",
        "objects": [
            {"shape": "circle", "color": "red", "count": None},
            {"shape": "square", "color": "blue", "count": None},
        ],
        "relation": {"a": 0, "b": 1, "rel": "left of"},
    }
    assert world.claims(" Three  Triangles. ")["objects"] == [{"shape": "triangle", "color": None, "count": 3}]
    with pytest.raises(ValueError, match="'a cat' is not in the shapes world's grammar"):
        world.claims("a cat")


def test_wrong_claims_fail_and_say_which():
    image = world.render("a red circle left of a blue square", 7)
    assert verify(image, world.claims("a red circle left of a blue square"))[0] == 1.0
    score, info = verify(image, world.claims("a red circle right of a blue square"))
    assert score == pytest.approx(2 / 3) and info["failed"] == ["right of"]
    score, info = verify(image, world.claims("a blue circle and a red square"))
    assert score == 0.0 and info["failed"] == ["a blue circle", "a red square"] and not info["correct"]
    score, info = verify(world.render("three triangles", 1), world.claims("two triangles"))
    assert score == 0.0 and info["failed"] == ["2 x triangle (found 3)"]
    assert verify(np.full((64, 64, 3), 230, np.uint8), world.claims("a circle"))[0] == 0.0


def test_detect_finds_each_shape_colour_and_centre():
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), (230, 230, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle([4, 4, 16, 16], fill=world.COLORS["green"])
    draw.ellipse([40, 8, 56, 24], fill=world.COLORS["purple"])
    draw.polygon([(20, 40), (30, 60), (10, 60)], fill=world.COLORS["yellow"])
    found = sorted(detect(np.asarray(image)), key=lambda d: d["x"])
    assert [(d["color"], d["shape"]) for d in found] == [
        ("green", "square"),
        ("yellow", "triangle"),
        ("purple", "circle"),
    ]
    assert (found[0]["x"], found[0]["y"], found[0]["area"]) == (10.0, 10.0, 169)
    mask = np.zeros((5, 7), bool)
    mask[0, :3] = mask[4, 4:] = mask[1:4, 6] = True  # an L-shaped run around the corner, and a separate bar
    assert sorted(len(c) for c in components(mask)) == [3, 6]


def test_renders_are_seeded_and_the_split_is_what_ships():
    assert np.array_equal(world.render("two squares", 5), world.render("two squares", 5))
    assert not np.array_equal(world.render("two squares", 5), world.render("two squares", 6))
    split = world.split()
    for part in ("train", "heldout"):
        shipped = (ASSETS / f"shapes_{part}.txt").read_text().split("\n")[:-1]
        assert shipped == [c for category in world.CATEGORIES for c in split[part][category]]
    for category in world.CATEGORIES:
        assert split["heldout"][category] and not set(split["heldout"][category]) & set(split["train"][category])
    for name, part in (("shapes_eval.txt", "heldout"), ("shapes_eval_seen.txt", "train")):
        evaluation = (ASSETS / name).read_text().split("\n")[:-1]
        assert evaluation == world.evaluation_captions(part)
        counts = {c: sum(world.claims(p)["category"] == c for p in evaluation) for c in world.CATEGORIES}
        assert counts == {c: 60 for c in world.CATEGORIES} and set(evaluation) <= set(sum(split[part].values(), []))
    # every held-out caption is evaluated; the seen set takes 60 of the 90 training colour attributions
    assert len(set(world.evaluation_captions("heldout"))) == 43 and len(set(world.evaluation_captions("train"))) == 104


def test_prompt_fn_gives_training_captions_with_their_claims():
    draw = make_prompt_fn("shapes")
    rng = np.random.default_rng(0)
    train = set((ASSETS / "shapes_train.txt").read_text().split("\n"))
    for _ in range(200):
        caption, metadata = draw(rng)
        assert caption in train and metadata == {"claims": world.claims(caption)}


def test_the_scorer_prefers_metadata_claims_and_refuses_other_captions():
    scorer = ShapesVerifier()
    image = world.render("a red circle", 0)
    out = scorer.score(image[None], ["anything"], [{"claims": world.claims("a red circle")}])
    assert out.scores.tolist() == [1.0] and out.info["category"] == ["colors"] and out.info["correct"] == [True]
    with pytest.raises(ValueError, match=r"prompts\.1: caption 'a dog'"):
        scorer.check(["a circle", "a dog"], [{}, {}])
    images = np.stack([image, world.render("a red circle left of a blue square", 7)])
    partial = ["a red circle", "a red circle right of a blue square"]  # all claims, then 2 of 3
    assert scorer.score(images, partial, [{}, {}]).scores.tolist() == [1.0, pytest.approx(2 / 3)]
    assert ShapesVerifier(strict=True).score(images, partial, [{}, {}]).scores.tolist() == [1.0, 0.0]


def test_reward_server_serves_the_verifier(start_server):
    server = start_server("--model", "shapes")
    captions = ["a red circle and a blue square", "three triangles", "a circle above a square"]
    images = np.stack([world.render(c, i) for i, c in enumerate(captions)])
    with RewardClient(server.url) as client:
        out = client.submit(images, captions, [{}, {}, {"claims": world.claims("four triangles")}]).result(timeout=60)
    assert list(out.scores) == [1.0, 1.0, 0.0]
    assert out.info["failed"][2] == ["4 x triangle (found 0)"]
    bad = httpx.post(
        f"{server.url}/v1/score",
        content=build_request(images[:2], ["a circle", "a unicorn"]),
        headers={"content-type": MEDIA_TYPE},
        timeout=30,
    )
    error = unpack(bad.content)["error"]
    assert bad.status_code == 422 and error["field"] == "prompts.1" and "'a unicorn' is not in" in error["message"]
    with RewardClient(server.url) as client:  # and it goes on serving
        assert list(client.submit(images[:1], captions[:1]).result(timeout=60).scores) == [1.0]


BAD_CLAIMS = [  # each was once a 500 scorer_error with a traceback, or (a: -1) accepted
    ("lol", "metadata.0.claims", "dictionary"),
    ({"category": "x"}, "metadata.0.claims.objects", "required"),
    ({"objects": []}, "metadata.0.claims.objects", "at least 1"),
    (
        {"objects": [{"shape": "circle"}, {"shape": "square"}], "relation": {"a": 0, "b": 99, "rel": "left of"}},
        "metadata.0.claims.relation.b",
        "99 is not one of the 2 objects",
    ),
    (
        {"objects": [{"shape": "circle"}, {"shape": "square"}], "relation": {"a": -1, "b": 1, "rel": "left of"}},
        "metadata.0.claims.relation.a",
        "greater than or equal to 0",
    ),
    ({"objects": [{"shape": "hexagon"}]}, "metadata.0.claims.objects.0.shape", "'circle', 'square' or 'triangle'"),
    ({"objects": [{"shape": "circle", "count": "two"}]}, "metadata.0.claims.objects.0.count", "integer"),
    ({"objects": [{"shape": "circle", "count": 0}]}, "metadata.0.claims.objects.0.count", "greater than or equal to 1"),
    ({"objects": [{"shape": "circle", "colour": "red"}]}, "metadata.0.claims.objects.0.colour", "not permitted"),
]


def test_malformed_claims_are_a_422_naming_the_field_and_the_server_keeps_serving(start_server):
    server = start_server("--model", "shapes")
    image = world.render("a red circle", 0)[None]
    for claims, field, message in BAD_CLAIMS:
        bad = httpx.post(
            f"{server.url}/v1/score",
            content=build_request(image, ["a red circle"], [{"claims": claims}]),
            headers={"content-type": MEDIA_TYPE},
            timeout=30,
        )
        error = unpack(bad.content)["error"]
        assert (bad.status_code, error["code"], error["field"]) == (422, "invalid_request", field), (claims, error)
        assert message in error["message"] and "Traceback" not in error["message"], (claims, error)
    assert "Traceback" not in server.log.read_text()  # refused, not crashed
    with RewardClient(server.url) as client:  # well-formed claims still score, and the server goes on serving
        out = client.submit(image, ["anything"], [{"claims": world.claims("a red circle")}]).result(timeout=60)
    assert list(out.scores) == [1.0]


def test_in_process_scoring_checks_the_claims_the_same_way():
    image = world.render("a red circle", 0)[None]
    for claims, field, message in BAD_CLAIMS:
        with pytest.raises(ValueError, match=f"^{field}: .*{message}"):
            ShapesVerifier().score(image, ["a red circle"], [{"claims": claims}])
