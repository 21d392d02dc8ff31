"""Prompt sets: what they draw, with which metadata, reproducibly."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.prompts import PROMPT_FNS, make_prompt_fn


def draws(name, n=400, seed=0, **kw):
    fn, rng = make_prompt_fn(name, **kw), np.random.default_rng(seed)
    return [fn(rng) for _ in range(n)]


def test_imagenet_sets_match_ddpo_ranges():
    dogs = {p for p, _ in draws("imagenet_dogs", 5000)}
    animals = {p for p, _ in draws("imagenet_animals", 20000)}
    everything = {p for p, _ in draws("imagenet_all", 40000)}
    assert len(dogs) == 118 and "Chihuahua" in dogs and "Mexican hairless" in dogs and "tench" not in dogs
    assert len(animals) >= 395 and "tench" in animals and "abacus" not in animals  # a few lemmas repeat
    assert "abacus" in everything and dogs < animals < everything


def test_nouns_activities_and_counting_metadata():
    for prompt, meta in draws("nouns_activities", 50):
        assert prompt.startswith("a ") and prompt.endswith(("washing the dishes", "riding a bike", "playing chess"))
        assert meta == {}
    for prompt, meta in draws("counting", 50):
        number, animal = prompt.split(" ", 1)
        assert meta["answers"] == [number] and number in {"one", "two", "three", "four"}
        assert meta["questions"][0].startswith("How many ") and meta["questions"][0].endswith(
            "are there in this image?"
        )


@pytest.mark.parametrize("name", sorted(PROMPT_FNS))
def test_same_seed_same_prompts(name):
    assert draws(name, 20, seed=3) == draws(name, 20, seed=3) != draws(name, 20, seed=4)


def test_from_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red fox\n\n  a blue owl  \n")
    assert {p for p, _ in draws("from_file", 50, path=path)} == {"a red fox", "a blue owl"}
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="has no prompts"):
        make_prompt_fn("from_file", tmp_path / "empty.txt")
