"""The prompt-format check renders each distinct format once: candidates are keyed by their tokenizer's content and
template, not by folder (renders counted by wrapping its per-row render); its lengths are encode_row's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tasks.config.schema import DatasetSpec, SearchConfig
from tasks.core.errors import UserError
from tasks.data.load import Example
from tasks.models import format_check as fc
from tasks.models.chat import encode_row, load_tokenizer, prompt_format


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The zoo's tokenizer saved once (no weights: the check reads tokenizers only)."""
    from tasks.demo.zoo import build_tokenizer

    folder = tmp_path_factory.mktemp("tok") / "tok"
    build_tokenizer().save_pretrained(str(folder))
    return folder


def copies(tokenizer_dir: Path, root: Path, n: int) -> dict[str, Path]:
    """n folders holding byte-identical tokenizers (one family's fine-tunes), by candidate name."""
    out = {}
    for k in range(n):
        out[f"ft{k:02d}"] = root / f"ft{k:02d}"
        shutil.copytree(tokenizer_dir, out[f"ft{k:02d}"])
    return out


def examples(n: int) -> list[Example]:
    """n rows with a system message, each answer a word longer than the one before."""
    return [Example(f"r{k}", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question {k}?"}],
                    "Answer" + " yes" * k + ".", line=k + 1) for k in range(n)]


def rows(n: int = 10) -> fc.Rows:
    """One dataset of n training and n test rows."""
    return {"d": (DatasetSpec(name="d", train="d_train.jsonl", test="d_test.jsonl"), examples(n), examples(n))}


def config(folders: dict[str, Path], **per_candidate: dict) -> SearchConfig:
    """A search over the folders as candidates (extra fields per candidate name)."""
    return SearchConfig.model_validate({
        "name": "formats",
        "candidates": [{"name": n, "path": str(p), **per_candidate.get(n, {})} for n, p in folders.items()],
        "datasets": [{"name": "d", "train": "d_train.jsonl", "test": "d_test.jsonl"}],
        "finetune": {"max_length": 512},
    })


def _format(folder: Path) -> tuple:
    """(tokenizer, prompt format) of a folder's own template, as training loads them."""
    tok = load_tokenizer(folder, fc.LoadOptions())
    return tok, prompt_format(tok)


@pytest.fixture()
def renders(monkeypatch) -> list[int]:
    """How many rows check_formats rendered (calls of its per-row render, _render_row)."""
    count = [0]
    render_row = fc._render_row

    def counted(*a, **k):
        count[0] += 1
        return render_row(*a, **k)

    monkeypatch.setattr(fc, "_render_row", counted)
    return count


def test_twelve_candidates_with_one_tokenizer_are_one_format(tokenizer_dir, tmp_path, renders):
    folders = copies(tokenizer_dir, tmp_path, 12)
    loads, warnings, note = fc.check_formats(config(folders), folders, rows(10))
    assert renders[0] == 20  # each of the 20 rows once, not 12 times
    assert note == ("format check: 20 rows rendered in 1 distinct prompt format for 12 local candidates "
                    "(20 renders, 1 tokenizer loaded)")
    assert sorted(loads) == sorted(folders) and len({d for _, d in loads.values()}) == 1 and not warnings


def test_two_templates_on_one_tokenizer_are_two_formats(tokenizer_dir, tmp_path, renders):
    folders = copies(tokenizer_dir, tmp_path, 3)
    cfg = config(folders, ft02={"chat_template": "default"})
    loads, _, note = fc.check_formats(cfg, folders, rows(10))
    assert renders[0] == 40
    assert "20 rows rendered in 2 distinct prompt formats for 3 local candidates (40 renders, 2 tokenizers" in note
    assert loads["ft00"][0].chat_template is None and "default" in loads["ft02"][1]
    assert loads["ft00"] == loads["ft01"]


def test_a_different_tokenizer_file_is_another_format(tokenizer_dir, tmp_path, renders):
    folders = copies(tokenizer_dir, tmp_path, 2)
    path = folders["ft01"] / "tokenizer_config.json"
    conf = json.loads(path.read_text())
    path.write_text(json.dumps({**conf, "model_max_length": 4096}))  # same tokens, other bytes: not assumed equal
    assert fc.tokenizer_content(folders["ft00"], False) != fc.tokenizer_content(folders["ft01"], False)
    assert fc.tokenizer_content(folders["ft00"], False) != fc.tokenizer_content(folders["ft00"], True)
    _, _, note = fc.check_formats(config(folders), folders, rows(5))
    assert renders[0] == 20 and "in 2 distinct prompt formats" in note


def test_a_shared_format_names_its_candidates_in_warnings_and_errors(tokenizer_dir, tmp_path):
    folders = copies(tokenizer_dir, tmp_path, 5)
    cfg = config(folders).model_copy(update={"finetune": config(folders).finetune.model_copy(update={"max_length": 8})})
    _, warnings, _ = fc.check_formats(cfg, folders, rows(4))
    longest = len(encode_row(*_format(folders["ft00"]), examples(4)[3].prompt, examples(4)[3].answer)[0])
    assert warnings == ["candidates 'ft00', 'ft01', 'ft02' and 2 more (one tokenizer and template): 4 of 4 training rows "
                        f"of d_train.jsonl are longer than finetune.max_length 8 (the longest, line 4, is {longest} "
                        "tokens); they are left out of their fine-tunes, never cut short; raise finetune.max_length to "
                        "keep them"]
    from tasks.models.templates import TEMPLATES

    refusing = tmp_path / "refuses.jinja"  # the default template, refusing one row
    refusing.write_text("{% for m in messages %}{% if m['content'] == 'Question 3?' %}{{ raise_exception('no "
                        "thanks') }}{% endif %}{% endfor %}" + TEMPLATES["default"])
    bad = config(folders, **{n: {"chat_template": str(refusing)} for n in ("ft01", "ft03")})
    with pytest.raises(UserError) as info:
        fc.check_formats(bad, folders, rows(4))
    assert str(info.value) == ("candidates 'ft01', 'ft03' (one tokenizer and template): d_train.jsonl:4: its chat "
                               "template refuses this conversation (no thanks)")


@pytest.mark.parametrize("max_length", [31, 40, 55])
def test_long_rows_are_counted_as_encode_row_counts_them(tokenizer_dir, tmp_path, max_length):
    # The check tokenizes only the full conversation and asks encode_row only past max_length: the same rows, the same
    # count. Rows are 26 to 60 tokens; at 40 the 40-token row's conversation is 41 (the template's newline after the
    # end of turn), so encode_row decides it fits.
    folders = copies(tokenizer_dir, tmp_path, 1)
    cfg = config(folders)
    cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"max_length": max_length})})
    _, warnings, _ = fc.check_formats(cfg, folders, rows(12))
    lengths = [len(encode_row(*_format(folders["ft00"]), ex.prompt, ex.answer)[0]) for ex in examples(12)]
    over = [(n, k + 1) for k, n in enumerate(lengths) if n > max_length]
    assert 0 < len(over) < 12
    n, line = max(over)
    assert warnings == [f"candidate 'ft00': {len(over)} of 12 training rows of d_train.jsonl are longer than "
                        f"finetune.max_length {max_length} (the longest, line {line}, is {n} tokens); they are left out "
                        "of its fine-tune, never cut short; raise finetune.max_length to keep them"]
