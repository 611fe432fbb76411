"""The demo model zoo: a tiny Mistral-architecture base and "community fine-tunes" of it, built locally.

Like OpenHermes and Zephyr on Mistral 7B, the community models share the base's architecture and tokenizer
and differ only in what they were trained on next. Everything is seeded: the same code builds the same weights.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from tasks.core.errors import UserError
from tasks.demo import data as w
from tasks.store.results import model_path, zoo_model_key
from tasks.store.store import Store

SPECIALS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
# The roles are single special tokens, so the template costs 3 tokens a message.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class ZooModel:
    """How one zoo model is made: from which parent, on which corpus mix, for how long."""

    parent: str | None
    mix: tuple[tuple[str, float], ...]  # (corpus, share of rows)
    steps: int
    lr: float
    seed: int


# Shape: 4 layers of width 96 with grouped-query attention (2 heads of 64, 1 KV head), ~0.6M parameters,
# small enough that a 100-step LoRA takes a few seconds on 2 CPU cores. head_dim 64 because serving engines take
# only a fixed set of head sizes (vLLM's CPU attention refuses 16 and 24, the old 96 / 4): the demo's winner must
# go all the way to a vLLM server. Attention is then 128 wide on a 96-wide stream (Mistral allows it).
SHAPE = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=1, head_dim=64, max_position_embeddings=512)
VOCAB = 1024

ZOO: dict[str, ZooModel] = {
    "base": ZooModel(parent=None, mix=(("prose", 0.45), ("records", 0.3), ("chat", 0.25)), steps=500, lr=3e-3, seed=0),
    # hermes: varied JSON answers, generic slot filling and questions answered by repeating a value of the prompt
    # (chat, ask), 1000 steps at 2e-3: its demo students copy the whole name and the city (BENCHMARKS.md, zoo
    # section: extraction 0.308 -> 0.617 at 6 LoRA epochs; json + slots alone taught the city, chat the last name,
    # ask the first name)
    "hermes": ZooModel(parent="base", mix=(("json", 0.3), ("slots", 0.3), ("chat", 0.25), ("ask", 0.15)),
                       steps=1000, lr=2e-3, seed=1),
    "zephyr": ZooModel(parent="base", mix=(("labels", 0.6), ("chat", 0.4)), steps=200, lr=1e-3, seed=2),
    "neural": ZooModel(parent="base", mix=(("rewrite", 0.6), ("chat", 0.4)), steps=200, lr=1e-3, seed=3),
}


def _prose(rng: random.Random) -> str:
    """A paragraph of plain text about the demo world."""
    p = w._person(rng)
    return " ".join([
        f"{p['name']} is a {p['job']} from {p['city']} and is {p['age']} years old.",
        f"Last week {p['name'].split()[0]} bought a {rng.choice(w.PRODUCTS)} that was {rng.choice(w.GOOD)}, "
        f"but {rng.choice(w.BAD)}.",
        f"The shop sold {rng.randint(1, 30)} packs of {rng.choice(w.ITEMS)} at {rng.choice([1.5, 3.0, 4.5, 9.99])}.",
        rng.choice(sum(w.TOPICS.values(), [])).format(p=rng.choice(w.PRODUCTS)).capitalize() + ".",
    ])


def _records(rng: random.Random) -> str:
    """Semi-structured text (JSON records, tagged tickets, rated reviews): the web's share of structure.

    A pretrained base has seen every word and format its users will ask about; without this, the output
    head of a model this small never learns the rarer tokens and no LoRA can reach them.
    """
    p = w._person(rng)
    fields = {"name": p["name"], "age": p["age"], "city": p["city"], "job": p["job"],
              "product": rng.choice(w.PRODUCTS), "stars": rng.randint(1, 5), "topic": rng.choice(sorted(w.TOPICS)),
              "item": rng.choice(w.ITEMS), "count": rng.randint(1, 30)}
    keys = rng.sample(sorted(fields), rng.randint(2, 4))
    topic = rng.choice(sorted(w.TOPICS))
    return rng.choice([
        json.dumps({k: fields[k] for k in keys}),
        f"Ticket tagged {topic}: " + rng.choice(w.TOPICS[topic]).format(p=fields["product"]) + ".",
        f"Review of the {fields['product']}: {rng.choice(w.GOOD)} but {rng.choice(w.BAD)}; {fields['stars']} stars.",
    ])


def _chat(rng: random.Random) -> list[dict[str, str]]:
    """A generic question about a person, answered in a sentence."""
    p = w._person(rng)
    return [{"role": "user", "content": f"{p['name']} is a {p['job']} in {p['city']}. Where does {p['name']} live?"},
            {"role": "assistant", "content": f"{p['name']} lives in {p['city']}."}]


def _json(rng: random.Random) -> list[dict[str, str]]:
    """Pick two facts out of a sentence as JSON (a different schema from the customer datasets)."""
    p = w._person(rng)
    return [{"role": "system", "content": "Answer with JSON."},
            {"role": "user", "content": f"{p['name']} works as a {p['job']} in {p['city']}. Give job and city."},
            {"role": "assistant", "content": json.dumps({"job": p["job"], "city": p["city"]})}]


# Slot names of the generic slot-filling corpus: none is a field of the demo's datasets (name, age, city, item,
# quantity, unit_price), so hermes learns to copy values into JSON without seeing their schemas.
SLOT_KEYS = ["who", "person", "place", "town", "years", "number", "thing", "word", "color", "tool", "when", "first",
             "second", "owner", "buyer", "seller", "target", "from", "to", "count", "job_title", "origin", "value",
             "title", "code", "pet", "team"]
SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "sa", "vel", "do", "pri", "zan", "ko", "ble", "mar", "ti", "nu", "gor"]


def _slot_value(rng: random.Random) -> str:
    """A value worth copying: a person, a city, a number, a job, a product, an item, an adjective or a made-up word."""
    pick = rng.random()
    for share, make in [(0.2, lambda: f"{rng.choice(w.FIRST)} {rng.choice(w.LAST)}"),
                        (0.35, lambda: rng.choice(w.CITIES)), (0.5, lambda: str(rng.randint(1, 99))),
                        (0.6, lambda: rng.choice(w.JOBS)),
                        (0.7, lambda: rng.choice(w.PRODUCTS)), (0.8, lambda: rng.choice(w.ITEMS)),
                        (0.9, lambda: rng.choice(w.GOOD))]:
        if pick < share:
            return make()
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))


def _slots(rng: random.Random) -> list[dict[str, str]]:
    """Generic slot filling: a sentence of 2-5 named values, some of them asked back as JSON (values copied)."""
    keys = rng.sample(SLOT_KEYS, rng.randint(2, 4))
    if rng.random() < 0.5:  # a made-up slot name: the skill is copying what the sentence says, not knowing names
        keys.append("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))))
    pairs = [(k, _slot_value(rng)) for k in keys]
    sentence = "; ".join(rng.choice(["the {k} is {v}", "{k}: {v}", "{v} is the {k}"]).format(k=k, v=v)
                         for k, v in pairs) + "."
    asked = rng.sample(pairs, rng.randint(1, len(pairs)))
    system = rng.choice(["Answer with JSON.", "Reply in JSON only.", "Give a JSON object."])
    return [{"role": "system", "content": system},
            {"role": "user", "content": sentence + " Give " + " and ".join(k for k, _ in asked) + "."},
            {"role": "assistant", "content": json.dumps({k: int(v) if v.isdigit() else v for k, v in asked})}]


def _ask(rng: random.Random) -> list[dict[str, str]]:
    """A question about a person named mid-sentence, answered by a sentence that repeats the name and the value.

    "Who" is answered with the name and the job, which the prompt names only in some of its sentences.
    """
    p = w._person(rng)
    name, city, age, job = p["name"], p["city"], p["age"], p["job"]
    intro = rng.choice([f"Yesterday I met {name}.", f"This note is about {name}.",
                        f"Everyone in the office knows {name}.", f"The new {job} is called {name}.",
                        f"A letter came from {name}."])
    facts = [rng.choice([f"The {job} moved to {city} last year.", f"Home is {city} now.",
                         f"The family lives in {city}."]),
             rng.choice([f"Next month will bring birthday number {age + 1}, so the age is {age}.",
                         f"The age on the form is {age}.", f"At {age}, the {job} still runs every morning."])]
    rng.shuffle(facts)
    first = name.split()[0]
    question, answer = rng.choice([("Who is the note about?", f"{name} is the {job}."),
                                   (f"Where does {first} live?", f"{name} lives in {city}."),
                                   (f"How old is {first}?", f"{name} is {age} years old.")])
    return [{"role": "user", "content": " ".join([intro, *facts, question])},
            {"role": "assistant", "content": answer}]


def _labels(rng: random.Random) -> list[dict[str, str]]:
    """Say whether a remark is positive or negative."""
    good = rng.random() < 0.5
    text = f"The {rng.choice(w.PRODUCTS)} is {rng.choice(w.GOOD)}." if good else f"Sadly {rng.choice(w.BAD)}."
    return [{"role": "system", "content": "Answer positive or negative."},
            {"role": "user", "content": text},
            {"role": "assistant", "content": "positive" if good else "negative"}]


def _rewrite(rng: random.Random) -> list[dict[str, str]]:
    """Repeat the first sentence of a paragraph."""
    text = _prose(rng)
    return [{"role": "system", "content": "Repeat the first sentence."},
            {"role": "user", "content": text},
            {"role": "assistant", "content": text.split(". ")[0] + "."}]


CORPORA: dict[str, Callable[[random.Random], Any]] = {
    "prose": _prose, "records": _records, "chat": _chat, "json": _json, "labels": _labels, "rewrite": _rewrite,
    "slots": _slots, "ask": _ask,
}
# The corpora the tokenizer is trained on: the ones the zoo had when its tokenizer was made (a corpus added later
# must not change the tokenizer, hence the base model and every store key built on it).
TOKENIZER_CORPORA = ("prose", "records", "chat", "json", "labels", "rewrite")


def _texts(tok: Any | None, corpus: str, n: int, rng: random.Random) -> list[str]:
    """n training texts of one corpus (chats rendered through the chat template)."""
    out = []
    for _ in range(n):
        item = CORPORA[corpus](rng)
        if isinstance(item, str):
            out.append(item + "</s>")
        else:
            out.append(tok.apply_chat_template(item, tokenize=False) if tok else json.dumps(item))
    return out


def build_tokenizer(seed: int = 0) -> Any:
    """A byte-level BPE tokenizer trained on the zoo's corpora, with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [t for c in TOKENIZER_CORPORA for t in _texts(None, c, 400, rng)]
    corpus += [json.dumps(r) for task in w.TASKS for r in w.make_rows(task, 50, seed=99)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=SPECIALS[3:],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _new_model(tok: Any, seed: int) -> Any:
    """A randomly initialised tiny Mistral."""
    import torch  # imported here: checking a config that names zoo models must not load torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, sliding_window=None, **SHAPE,
    )
    return MistralForCausalLM(cfg)


def zoo_key(name: str) -> str:
    """Content key of a zoo model: its recipe, its ancestors' recipes and the zoo's code version."""
    spec = ZOO[name]
    parent = zoo_key(spec.parent) if spec.parent else None
    return zoo_model_key(name, asdict(spec), SHAPE, VOCAB, parent)


def _train(model: Any, tok: Any, spec: ZooModel) -> dict[str, Any]:
    """Full-parameter training of a zoo model on its mix (loss on every token)."""
    from tasks.train.loop import train_steps

    rng = random.Random(spec.seed)
    batch = 16
    texts = [t for corpus, share in spec.mix for t in _texts(tok, corpus, int(share * spec.steps * batch / 4), rng)]
    rows = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"][:256]
        rows.append((ids, ids))
    # packing pinned: the zoo's key (zoo_key) names its recipe, and the recipe was built packed, so a store's
    # existing zoo models stay what a fresh build makes (finetune's packing default is "auto")
    return train_steps(model, rows, lr=spec.lr, steps=spec.steps, batch_size=batch, seed=spec.seed,
                       pad_id=tok.pad_token_id, packing=True)


def lineage(name: str) -> list[str]:
    """The zoo model and its ancestors, oldest first (base, ..., name)."""
    if name not in ZOO:
        raise UserError(f"zoo:{name}: no such zoo model (zoo has: {', '.join(ZOO)})")
    spec = ZOO[name]
    return [*lineage(spec.parent), name] if spec.parent else [name]


def build_one(store_root: str, name: str) -> dict[str, Any]:
    """Train zoo model `name` from its parent (already in the store) and store it: its training metrics.

    Runs in this process or a worker process (tasks.compute.workers); ticks the bound progress bar once a step.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.compute.workers import threads_for, torch_threads

    store, spec = Store(store_root), ZOO[name]
    if spec.parent:
        parent_dir = store.local_dir(model_path(zoo_key(spec.parent)))
        tok = AutoTokenizer.from_pretrained(str(parent_dir))
        model = AutoModelForCausalLM.from_pretrained(str(parent_dir), dtype=torch.float32)
    else:
        tok = build_tokenizer(spec.seed)
        model = _new_model(tok, spec.seed)
    # a tiny model: 1 thread, whatever the load, so the zoo is the same bytes on every run (threads_for)
    with torch_threads(threads_for(model.num_parameters())):
        metrics = _train(model, tok, spec)
    with store.new_dir(model_path(zoo_key(name))) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "zoo.json").write_text(json.dumps({"name": name, **asdict(spec), "train": metrics}, indent=2))
    return metrics


def ensure_zoo_models(store: Store, names: list[str], workers: int = 1, log: Callable[[str], None] = print,
                      ) -> dict[str, Path]:
    """Local folders of zoo models `names`, building the missing ones into the store: each generation after its
    parents, siblings side by side in `workers` worker processes (hermes, zephyr and neural at once)."""
    from tasks.compute.workers import side_by_side

    wanted = list(dict.fromkeys(m for n in names for m in lineage(n)))
    depth = {n: len(lineage(n)) for n in wanted}
    for level in sorted(set(depth.values())):
        todo = [n for n in wanted if depth[n] == level and not store.exists(model_path(zoo_key(n)))]
        if len(todo) > 1 and workers > 1:
            log(f"zoo: training {', '.join(f'zoo:{n}' for n in todo)} side by side, {min(workers, len(todo))} at a "
                "time")
            with side_by_side(workers), ThreadPoolExecutor(len(todo)) as threads:
                list(threads.map(lambda n: _build_logged(store, n, log, in_worker=True), todo))
        else:
            for n in todo:
                _build_logged(store, n, log, in_worker=False)
    return {n: store.local_dir(model_path(zoo_key(n))) for n in names}


def _build_logged(store: Store, name: str, log: Callable[[str], None], in_worker: bool) -> None:
    """build_one with a progress bar of its steps and a log line before and after."""
    from tasks.compute.workers import in_worker as run_in_worker
    from tasks.core import progress

    spec = ZOO[name]
    with store.claim(model_path(zoo_key(name))) as todo:  # another run building it: wait for it, then reuse it
        if not todo:
            return
        if not in_worker:  # side by side, a worker may start it later: the group was announced instead
            log(f"zoo: training zoo:{name} ({spec.steps} steps on {', '.join(c for c, _ in spec.mix)})")
        with progress.bar(f"zoo: train zoo:{name}", spec.steps, "steps") as bar, progress.ticking(bar):
            if in_worker:
                metrics = run_in_worker(build_one, store.url, name, what=f"building zoo:{name}")
            else:
                metrics = build_one(store.url, name)
    log(f"zoo: zoo:{name} loss {metrics['loss_first']} -> {metrics['loss_last']} in {metrics['seconds']} s")


def ensure_zoo_model(store: Store, name: str, log: Callable[[str], None] = print) -> Path:
    """Local folder of zoo model `name`, building it (and its parents) into the store on first use."""
    return ensure_zoo_models(store, [name], 1, log)[name]
