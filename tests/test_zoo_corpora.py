"""The zoo's community corpora stay generic: they teach copying from the prompt, never a demo dataset's schema."""

from __future__ import annotations

import json
import random

from tasks.demo import zoo
from tasks.demo.data import CITIES


def test_ask_answers_repeat_the_prompts_name_and_the_asked_value():
    rng = random.Random(0)
    asked = set()
    for _ in range(200):
        user, answer = (m["content"] for m in zoo._ask(rng))
        words = answer.rstrip(".").split()
        assert " ".join(words[:2]) in user  # the whole name, copied from the middle of a sentence
        if user.endswith("live?"):
            asked.add("where")
            assert words[-1] in CITIES and f" {words[-1]} " in f" {user} ".replace(".", " ")
        elif "How old" in user:
            asked.add("age")
            assert f" {words[3]}" in user and words[4:] == ["years", "old"]
        else:  # "Who is the note about?": the name (its job is named in the prompt only by some intros)
            asked.add("who")
            assert user.endswith("Who is the note about?") and words[2:4] == ["is", "the"]
        assert "{" not in user + answer  # no JSON: nothing to learn a schema from
    assert len(asked) == 3  # who, where and how old are all asked


def test_slot_filling_and_questions_use_none_of_the_demo_datasets_fields():
    # (the zoo's first JSON corpus, `json`, asks "job and city": it predates these two and shares one key)
    fields = {"name", "age", "city", "item", "quantity", "unit_price"}
    rng = random.Random(1)
    for corpus in ("slots", "ask"):
        for _ in range(200):
            answer = zoo.CORPORA[corpus](rng)[-1]["content"]
            assert corpus == "slots" or not answer.startswith("{")
            if answer.startswith("{"):
                assert not fields & set(json.loads(answer)), (corpus, answer)
    assert "ask" not in zoo.TOKENIZER_CORPORA  # the tokenizer, hence the base's store key, never sees it
