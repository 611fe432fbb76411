"""The demo's synthetic world: three customer datasets like the study's, a held-out one, and the zoo's corpus.

The assistant messages come from a *noisy teacher*: the ground truth corrupted at a fixed rate, a stand-in
for logged GPT-4 answers that are usually but not always right. `expected` holds the ground truth.
Everything is drawn from a seeded `random.Random`, so the files are byte-for-byte reproducible.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

FIRST = ["Maria", "John", "Aiko", "Omar", "Lena", "Pedro", "Grace", "Ivan", "Sofia", "Kwame", "Nora", "Liam",
         "Chen", "Amara", "Felix", "Priya", "Hugo", "Zara", "Mateo", "Elsa"]
LAST = ["Lopez", "Smith", "Tanaka", "Haddad", "Berg", "Silva", "Okafor", "Petrov", "Rossi", "Mensah", "Kim",
        "Walsh", "Wei", "Diallo", "Braun", "Nair", "Martin", "Khan", "Garcia", "Larsen"]
CITIES = ["Lisbon", "Osaka", "Cairo", "Oslo", "Lima", "Toronto", "Nairobi", "Berlin", "Madrid", "Seoul",
          "Dublin", "Mumbai", "Denver", "Accra", "Vienna", "Quito"]
JOBS = ["nurse", "teacher", "pilot", "chef", "engineer", "farmer", "lawyer", "painter", "baker", "driver"]
PRODUCTS = ["kettle", "laptop", "backpack", "blender", "headphones", "lamp", "jacket", "phone case", "desk chair",
            "coffee grinder", "tent", "monitor"]
GOOD = ["sturdy", "quiet", "light", "fast", "comfortable", "bright", "cheap", "stylish"]
BAD = ["the battery dies early", "the strap broke", "it runs hot", "shipping took weeks", "the lid leaks",
       "the manual is useless", "it scratches easily", "the cable is short"]
TOPICS = {
    "billing": ["I was charged twice for my {p}", "my invoice shows the wrong amount", "please refund the {p} payment",
                "why did my card get billed again"],
    "shipping": ["my {p} has not arrived yet", "the tracking number for my {p} does not work",
                 "the parcel with my {p} went to the wrong address", "when will my {p} be delivered"],
    "technical": ["my {p} will not turn on", "the {p} app keeps crashing", "the {p} stopped working after an update",
                  "I get an error when I connect the {p}"],
    "account": ["I cannot log in to my account", "please change the email on my account",
                "how do I reset my password", "I want to close my account"],
}
ITEMS = ["green tea", "coffee beans", "printer paper", "blue pens", "paper cups", "olive oil", "rice", "batteries",
         "notebooks", "light bulbs"]


def _person(rng: random.Random) -> dict[str, Any]:
    """A random person with a name, age, city and job."""
    return {"name": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "age": rng.randint(19, 79),
            "city": rng.choice(CITIES), "job": rng.choice(JOBS)}


def _extraction(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    """(system, user, truth) for person extraction to JSON."""
    p = _person(rng)
    text = rng.choice([
        "{name}, {age}, moved to {city} last spring and works as a {job}.",
        "Our new {job} is {name}. {name} is {age} years old and lives in {city}.",
        "Meet {name} from {city}: a {job}, aged {age}.",
        "{name} ({age}) is a {job} based in {city}.",
    ]).format(**p)
    return ("Extract the person's name, age and city as JSON.", text,
            {"name": p["name"], "age": p["age"], "city": p["city"]})


def _classification(rng: random.Random) -> tuple[str, str, str]:
    """(system, user, label) for support-ticket topic classification."""
    label = rng.choice(sorted(TOPICS))
    text = rng.choice(TOPICS[label]).format(p=rng.choice(PRODUCTS))
    lead = rng.choice(["", "Hello, ", "Hi team, ", "Urgent: "])
    return ("Classify the support message as billing, shipping, technical or account. Answer with the label.",
            (lead + text).capitalize() + ".", label)


def _summarization(rng: random.Random) -> tuple[str, str, str]:
    """(system, user, summary) for one-sentence review summaries."""
    prod, good, bad = rng.choice(PRODUCTS), rng.choice(GOOD), rng.choice(BAD)
    stars = rng.randint(1, 5)
    text = " ".join([
        f"I bought this {prod} a month ago.",
        rng.choice([f"It is really {good}.", f"I love how {good} it is.", f"Honestly it is {good}."]),
        rng.choice([f"Sadly {bad}.", f"But {bad}.", f"My only complaint: {bad}."]),
        f"I would give it {stars} stars.",
    ])
    return ("Summarize the review in one sentence.", text, f"The {prod} is {good} but {bad}; {stars} stars.")


def _orders(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    """(system, user, truth) for the held-out task: order lines to JSON with a schema used nowhere else."""
    item, qty = rng.choice(ITEMS), rng.randint(1, 24)
    price = rng.choice([1.5, 2.0, 2.25, 3.0, 4.5, 5.0, 7.75, 9.99, 12.0])
    text = rng.choice([
        "Please send {q} packs of {i} at {p} each.",
        "Order: {i}, quantity {q}, unit price {p}.",
        "We need {q} units of {i}; the price is {p} per unit.",
    ]).format(q=qty, i=item, p=price)
    return ("Extract the order as JSON with fields item, quantity and unit_price.", text,
            {"item": item, "quantity": qty, "unit_price": price})


def _noisy_json(truth: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """The teacher's slip on a JSON answer: one field dropped or replaced."""
    out = dict(truth)
    key = rng.choice(sorted(out))
    if rng.random() < 0.5:
        del out[key]
    else:
        out[key] = rng.choice(CITIES) if isinstance(out[key], str) else out[key] + rng.randint(1, 9)
    return out


def _noisy_label(truth: str, rng: random.Random) -> str:
    """The teacher's slip on a label: another label."""
    return rng.choice([t for t in sorted(TOPICS) if t != truth])


def _noisy_summary(truth: str, rng: random.Random) -> str:
    """The teacher's slip on a summary: the complaint or the rating left out."""
    head, stars = truth.split("; ")
    return head.split(" but ")[0] + "; " + stars if rng.random() < 0.5 else head + "."


# name -> (generator, teacher's slip, teacher error rate). 15% wrong: a strong but fallible teacher.
TASKS: dict[str, tuple[Callable[[random.Random], tuple[str, str, Any]], Callable[[Any, random.Random], Any], float]] = {
    "extraction": (_extraction, _noisy_json, 0.15),
    "classification": (_classification, _noisy_label, 0.15),
    "summarization": (_summarization, _noisy_summary, 0.15),
    "orders": (_orders, _noisy_json, 0.15),
}


def _render(answer: Any) -> str:
    """An answer as the assistant's message text."""
    return json.dumps(answer) if isinstance(answer, dict) else str(answer)


def make_rows(task: str, n: int, seed: int) -> list[dict[str, Any]]:
    """n rows of a demo task in the OpenAI fine-tuning format, with the teacher's answer and `expected`."""
    gen, slip, rate = TASKS[task]
    rng = random.Random(f"{task}-{seed}")
    rows = []
    for i in range(n):
        system, user, truth = gen(rng)
        answer = slip(truth, rng) if rng.random() < rate else truth
        rows.append({
            "id": f"{task}-{seed}-{i}",
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                         {"role": "assistant", "content": _render(answer)}],
            "expected": truth,
        })
    return rows


def _folded_prompt(row: dict[str, Any]) -> str:
    """A row's prompt (every message before the answer), case and whitespace folded: what a leak check compares."""
    return " ".join(" ".join(m["content"].split()).casefold() for m in row["messages"][:-1])


def _unique(task: str, n: int, seed: int, taken: set[str]) -> list[dict[str, Any]]:
    """n rows of a task whose prompts are all different and none in `taken` (which gains them)."""
    rows = []
    for row in make_rows(task, 20 * n, seed):  # classification, the smallest world, has 768 prompts
        key = _folded_prompt(row)
        if key not in taken:
            taken.add(key)
            rows.append(row)
            if len(rows) == n:
                return rows
    raise ValueError(f"demo task {task}: fewer than {n} distinct prompts from seed {seed}")


def make_split(task: str, n_train: int, n_test: int, seed: int = 1) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test) rows of a demo task without leaks: every prompt appears once, in one split only."""
    taken: set[str] = set()
    return _unique(task, n_train, seed, taken), _unique(task, n_test, seed + 1, taken)


def write_demo_datasets(folder: str | Path, n_train: int = 160, n_test: int = 40) -> dict[str, tuple[Path, Path]]:
    """Write <task>_train.jsonl and <task>_test.jsonl for every demo task; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for task in TASKS:
        pair = []
        for split, rows in zip(("train", "test"), make_split(task, n_train, n_test)):
            path = folder / f"{task}_{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            pair.append(path)
        paths[task] = (pair[0], pair[1])
    return paths


if __name__ == "__main__":
    # Regenerate the demo datasets shipped in configs/demo_data (a test checks they match).
    for name, (tr, te) in write_demo_datasets(Path(__file__).resolve().parents[2] / "configs" / "demo_data").items():
        print(name, tr, te)
