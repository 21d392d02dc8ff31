"""GenEval's rules (scorers/geneval_rules.py) on hand-made detections: every tag, the thresholds' edges,
GenEval's correctness and Flow-GRPO's fraction, and the metadata GenEval ships."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scorers import geneval_rules as rules

ASSETS = Path(__file__).parent.parent / "trainer" / "assets" / "geneval"


def det(name, score=0.95, box=(0, 0, 10, 10), color=None):
    return {"class": name, "score": score, "box": box, "mask": None, "paint": color}


def painted(name, objects):
    """The colour classifier's stand-in: each hand-made object carries the colour it was painted."""
    return [o["paint"] for o in objects]


def check(objects, metadata):
    """(GenEval's correctness, its reasons, Flow-GRPO's fraction) of already-selected objects."""
    by_class = {}
    for o in objects:
        by_class.setdefault(o["class"], []).append(o)
    correct, reasons = rules.evaluate(by_class, metadata, painted)
    return correct, reasons, rules.fraction(by_class, metadata, painted)


def test_selection_thresholds_are_strict_and_the_counting_tag_uses_its_own():
    found = [det("dog", 0.3), det("dog", 0.3001), det("cat", 0.9), det("cat", 0.95)]
    kept = rules.select(found, "two_object")
    assert [d["score"] for d in kept["dog"]] == [0.3001]  # above 0.3, not at it
    assert [d["score"] for d in kept["cat"]] == [0.95, 0.9]  # most confident first
    kept = rules.select(found, "counting")
    assert list(kept) == ["cat"] and [d["score"] for d in kept["cat"]] == [0.95]  # above 0.9 for counting
    assert [
        d["score"] for d in rules.select(found, "counting", {**rules.DEFAULTS, "counting_threshold": 0.25})["dog"]
    ] == [0.3001, 0.3]


def test_selection_keeps_the_16_most_confident_of_each_class_and_deduplicates_only_when_asked():
    found = [det("dog", 0.5 + i / 100) for i in range(20)] + [det("cat", 0.4)]
    kept = rules.select(found, "single_object")
    assert len(kept["dog"]) == 16 and kept["dog"][-1]["score"] == pytest.approx(0.54) and len(kept["cat"]) == 1
    # max_overlap 1.0 (GenEval's default) keeps identical boxes; below it, a box overlapping a kept one goes
    boxes = [det("dog", 0.9, (0, 0, 9, 9)), det("dog", 0.8, (1, 0, 10, 9)), det("dog", 0.7, (20, 20, 29, 29))]
    assert len(rules.select(boxes, "counting", {**rules.DEFAULTS, "counting_threshold": 0.5})["dog"]) == 3
    # inclusive boxes: 10 x 10 each, overlap 9 x 10 -> IoU 90 / 110 = 0.818
    assert rules.box_iou((0, 0, 9, 9), (1, 0, 10, 9)) == pytest.approx(90 / 110)
    for overlap, n in ((0.82, 3), (0.81, 2)):
        kept = rules.select(boxes, "counting", {**rules.DEFAULTS, "counting_threshold": 0.5, "max_overlap": overlap})
        assert len(kept["dog"]) == n


@pytest.mark.parametrize("gap, expected", [(2.0, set()), (4.0, set()), (4.01, {"left of"}), (30.0, {"left of"})])
def test_relative_position_edges(gap, expected):
    # A (10 wide) at x, B at x + gap: each axis shrinks by 0.1 x (10 + 10) = 2, and a side is named when the
    # shrunk offset is more than half the distance: gap - 2 > gap / 2, i.e. gap > 4.
    assert rules.relative_position((0, 0, 10, 10), (gap, 0, gap + 10, 10)) == expected
    assert rules.relative_position((gap, 0, gap + 10, 10), (0, 0, 10, 10)) == {
        r.replace("left", "right") for r in expected
    }


def test_relative_position_vertical_diagonal_and_threshold_option():
    assert rules.relative_position((0, 0, 10, 10), (0, 30, 10, 40)) == {"above"}  # image y grows downwards
    assert rules.relative_position((0, 30, 10, 40), (0, 0, 10, 10)) == {"below"}
    assert rules.relative_position((0, 0, 2, 2), (20, 20, 22, 22)) == {"left of", "above"}
    assert rules.relative_position((0, 0, 10, 10), (6, 0, 16, 10), threshold=0.0) == {"left of"}
    assert rules.relative_position((0, 0, 10, 10), (6, 0, 16, 10), threshold=0.3) == set()


def test_single_and_two_object():
    one = rules.parse("a photo of a dog")
    assert check([det("dog")], one) == (True, [], 1.0)
    assert check([], one) == (False, ["expected dog>=1, found 0"], 0.0)
    # GenEval: at least one; Flow-GRPO's count term: 1 - |1 - 3| / 1
    assert check([det("dog"), det("dog"), det("dog")], one) == (True, [], -1.0)
    two = rules.parse("a photo of a dog and a cat")
    assert check([det("dog"), det("cat")], two) == (True, [], 1.0)
    assert check([det("dog")], two) == (False, ["expected cat>=1, found 0"], 0.5)


def test_counting_is_exact_through_the_exclude():
    three = rules.parse("a photo of three dogs")
    assert three == {
        "tag": "counting",
        "include": [{"class": "dog", "count": 3}],
        "exclude": [{"class": "dog", "count": 4}],
    }
    assert check([det("dog")] * 3, three) == (True, [], 1.0)
    assert check([det("dog")] * 2, three) == (False, ["expected dog>=3, found 2"], pytest.approx(2 / 3))
    assert check([det("dog")] * 4, three) == (False, ["expected dog<4, found 4"], pytest.approx(2 / 3))


def test_colors_are_judged_on_the_most_confident_objects():
    red = rules.parse("a photo of a red car")
    assert check([det("car", color="red")], red) == (True, [], 1.0)
    assert check([det("car", color="blue")], red) == (False, ["expected red car>=1, found 0 red; and 1 blue"], 0.5)
    # two cars: GenEval looks at the most confident only; Flow-GRPO needs exactly one car, so no colour term
    assert check([det("car", 0.9, color="red"), det("car", 0.8, color="blue")], red)[:2] == (True, [])
    assert check([det("car", 0.9, color="blue"), det("car", 0.8, color="red")], red)[:2] == (
        False,
        ["expected red car>=1, found 0 red; and 1 blue"],
    )
    assert check([det("car", 0.9, color="red"), det("car", 0.8, color="blue")], red)[2] == 0.0  # (1 - 1 + 0) / 2
    attr = rules.parse("a photo of a red car and a blue bench")
    assert check([det("car", color="red"), det("bench", color="blue")], attr) == (True, [], 1.0)
    assert check([det("car", color="red"), det("bench", color="red")], attr)[::2] == (False, 0.75)


def test_position_needs_the_target_and_the_relation():
    left = rules.parse("a photo of a cup left of a vase")
    assert left == {
        "tag": "position",
        "include": [{"class": "vase", "count": 1}, {"class": "cup", "count": 1, "position": ["left of", 0]}],
    }
    cup, vase = det("cup", box=(0, 0, 10, 10)), det("vase", box=(30, 0, 40, 10))
    assert check([cup, vase], left) == (True, [], 1.0)
    right = det("cup", box=(60, 0, 70, 10))
    assert check([right, vase], left) == (
        False,
        ["expected cup left of target, found right of target"],
        pytest.approx(2 / 3),
    )
    over = det("cup", box=(31, 0, 41, 10))
    assert check([over, vase], left) == (
        False,
        ["expected cup left of target, found no relation to target"],
        pytest.approx(2 / 3),
    )
    assert check([cup], left) == (
        False,
        ["expected vase>=1, found 0", "no target for cup to be left of"],
        pytest.approx(1 / 3),
    )


def test_every_shipped_geneval_prompt_parses_to_its_metadata():
    rows = [json.loads(line) for line in (ASSETS / "evaluation_metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 553
    assert {tag: sum(r["tag"] == tag for r in rows) for tag in rules.TAGS} == {
        "single_object": 80,
        "two_object": 99,
        "counting": 80,
        "colors": 94,
        "position": 100,
        "color_attr": 100,
    }
    for row in rows:
        expected = {k: v for k, v in row.items() if k != "prompt"}
        assert rules.parse(row["prompt"]) == expected
        assert rules.checked(row) == expected


@pytest.mark.parametrize(
    "caption", ["a photo of a unicorn", "a photo of a red dog left of a cat", "a photo of a red dog and a cat", "two"]
)
def test_other_captions_are_refused(caption):
    with pytest.raises(ValueError, match="is not a GenEval prompt"):
        rules.parse(caption)


BAD_METADATA = [
    ({"tag": "colours", "include": [{"class": "dog", "count": 1}]}, "metadata.0.tag", "'single_object'"),
    ({"tag": "colors"}, "metadata.0.include", "required"),
    ({"tag": "colors", "include": []}, "metadata.0.include", "at least 1"),
    ({"tag": "colors", "include": [{"class": "dgo", "count": 1}]}, "metadata.0.include.0.class", "'person'"),
    (
        {"tag": "colors", "include": [{"class": "dog", "count": 0}]},
        "metadata.0.include.0.count",
        "greater than or equal to 1",
    ),
    (
        {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "teal"}]},
        "metadata.0.include.0.color",
        "'red'",
    ),
    (
        {"tag": "colors", "include": [{"class": "dog", "count": 1, "colour": "red"}]},
        "metadata.0.include.0.colour",
        "not permitted",
    ),
    (
        {"tag": "position", "include": [{"class": "dog", "count": 1, "position": ["left of", 0]}]},
        "metadata.0.include.0.position",
        "an earlier include",
    ),
    (
        {
            "tag": "position",
            "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["near", 0]}],
        },
        "metadata.0.include.1.position.0",
        "'left of'",
    ),
    (
        {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog"}]},
        "metadata.0.exclude.0.count",
        "required",
    ),
]


@pytest.mark.parametrize("metadata, field, message", BAD_METADATA)
def test_malformed_metadata_names_the_field(metadata, field, message):
    with pytest.raises(ValueError) as exc:
        rules.checked(metadata, "metadata.0")
    assert str(exc.value).startswith(f"{field}: ") and message in str(exc.value)


def test_the_sampler_regenerates_genevals_suite_from_its_seed():
    """create_prompts.py's generate_suite: seed 43, all 80 single objects, then 100 draws of each other tag,
    de-duplicated: exactly the 553 rows GenEval ships."""
    import numpy as np

    rng = np.random.default_rng(43)
    suite = [
        {
            "tag": "single_object",
            "include": [{"class": rules.CLASSES[i], "count": 1}],
            "prompt": f"a photo of {rules.with_article(rules.CLASSES[i])}",
        }
        for i in rng.choice(80, size=80, replace=False)
    ]
    suite += [rules.sample(rng, tag) for tag in rules.TAGS[1:] for _ in range(100)]
    unique = list({json.dumps(row, sort_keys=True): row for row in suite}.values())
    rows = [json.loads(line) for line in (ASSETS / "evaluation_metadata.jsonl").read_text().splitlines()]
    assert unique == rows
    assert (ASSETS / "evaluation_prompts.txt").read_text().splitlines() == [row["prompt"] for row in rows]


def test_the_training_prompts_come_from_the_templates_and_never_from_the_evaluation():
    import numpy as np

    from trainer.prompts import GENEVAL_TRAIN_TAGS, make_prompt_fn

    draw, rng = make_prompt_fn("geneval"), np.random.default_rng(0)
    evaluation = {
        json.loads(line)["prompt"] for line in (ASSETS / "evaluation_metadata.jsonl").read_text().splitlines()
    }
    drawn = [draw(rng) for _ in range(3000)]
    assert not {prompt for prompt, _ in drawn} & evaluation
    assert {meta["tag"] for _, meta in drawn} == set(GENEVAL_TRAIN_TAGS)
    assert len({prompt for prompt, _ in drawn}) > 2000  # far more than the evaluation's 473 of these tags
    for prompt, meta in drawn[:500]:
        assert rules.parse(prompt) == meta == rules.checked(meta)
    again = make_prompt_fn("geneval")
    assert [again(r) for r in [np.random.default_rng(0)] for _ in range(50)] == drawn[:50]  # seeded


def shapes_metadata(claims):
    """A shapes-world caption's claims as GenEval metadata (its shapes standing in for COCO classes)."""
    objs = [
        {"class": o["shape"], "count": o["count"] or 1, **({"color": o["color"]} if o["color"] else {})}
        for o in claims["objects"]
    ]
    meta = {"tag": claims["category"], "include": objs}
    if claims["category"] == "counting":
        meta["exclude"] = [{"class": objs[0]["class"], "count": objs[0]["count"] + 1}]
    if claims["relation"]:
        meta["include"] = [objs[1], {**objs[0], "position": [claims["relation"]["rel"], 0]}]
    return meta


def test_genevals_rules_on_the_shapes_verifiers_detections_agree_with_the_verifier():
    """Renders of held-out captions, each checked against its own caption or a training caption: GenEval's
    rules, fed the verifier's detections (score 1, its colours), reach the verifier's verdict, but for two
    documented differences. Colour: GenEval judges the most confident objects only (here the first found,
    all scoring 1), the verifier any object of the shape. Position: GenEval wants the named side to dominate
    the offset between box centres, the verifier only a margin on that axis, so diagonal placements the world
    renders for "above" may read "left of" to GenEval: it is the stricter, never the looser."""
    import numpy as np

    from scorers import world
    from scorers.shapes import detect, verify

    rng = np.random.default_rng(5)
    agree, position = 0, []
    for i in range(300):
        caption, _ = world.sample_caption(rng, "heldout")
        asked = caption if i % 2 == 0 else world.sample_caption(rng, "train")[0]
        image, claims = world.render(caption, rng), world.claims(asked)
        found = [
            {"class": d["shape"], "score": 1.0, "box": d["box"], "mask": None, "paint": d["color"]}
            for d in detect(image)
        ]
        objects = rules.select(found, claims["category"])
        correct, why = rules.evaluate(objects, shapes_metadata(claims), painted)
        verdict = verify(image, claims)[1]["correct"]
        if claims["category"] == "position":
            position.append((verdict, correct))
        elif correct != verdict:  # only the colour of a shape found more often than the caption counts
            (obj,) = [o for o in claims["objects"] if o["color"]]
            assert (
                verdict
                and len(objects[obj["shape"]]) > (obj["count"] or 1)
                and why[0].startswith(f"expected {obj['color']}")
            )
        agree += correct == verdict
    assert agree >= 280
    assert all(verdict for verdict, correct in position if correct)  # GenEval correct => the verifier too
    assert sum(verdict and not correct for verdict, correct in position) <= len(position) // 4


def test_equal_scores_rank_the_later_detection_first_as_genevals_argsort():
    first, second = det("dog", 0.8, (0, 0, 10, 10)), det("dog", 0.8, (50, 0, 60, 10))
    assert rules.select([det("dog", 0.9), first, second], "single_object")["dog"][1:] == [second, first]


def test_the_flow_grpo_fraction_is_its_gen_eval_py():
    """DiffusionNFT's (and Flow-GRPO's) flow_grpo/gen_eval.py evaluate_reward, its terms worked out by hand for
    each way an include fails; rule "parts" beside it."""
    left = rules.parse("a photo of a cup left of a vase")
    cup, vase, right = det("cup", box=(0, 0, 10, 10)), det("vase", box=(30, 0, 40, 10)), det("cup", box=(60, 0, 70, 10))
    red_left = {
        "tag": "color_attr",
        "include": [
            {"class": "vase", "count": 1},
            {"class": "cup", "count": 1, "color": "red", "position": ["left of", 0]},
        ],
    }
    cases = [  # objects, metadata, gen_eval.py's terms, ours
        ([cup, vase], left, [1, 1, 1], [1, 1, 1]),
        ([right, vase], left, [1, 1, 0, 1], [1, 1, 0]),  # the failed relation's 0, then its 1
        ([cup], left, [0, 1, 0], [0, 1, 0]),  # no target: a 0 only
        ([vase], red_left, [1, 0, 0], [1, 0, 0, 0]),  # no cup: one 0 for colour and position together
        ([vase, {**cup, "paint": "blue"}], red_left, [1, 1, 0], [1, 1, 0, 0]),  # wrong colour: no position term
        ([vase, {**cup, "paint": "red"}], red_left, [1, 1, 1, 1], [1, 1, 1, 1]),
    ]
    for objects, metadata, theirs, ours in cases:
        by_class = {}
        for o in objects:
            by_class.setdefault(o["class"], []).append(o)
        assert rules.fraction(by_class, metadata, painted, rule="flow_grpo") == pytest.approx(sum(theirs) / len(theirs))
        assert rules.fraction(by_class, metadata, painted) == pytest.approx(sum(ours) / len(ours))
    from scorers.geneval import GenEvalScorer

    assert GenEvalScorer(checkpoint="tiny", fraction="flow_grpo").fraction == "flow_grpo"
    with pytest.raises(ValueError, match="fraction"):
        GenEvalScorer(checkpoint="tiny", fraction="anchor")
