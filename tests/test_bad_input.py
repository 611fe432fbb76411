"""Bad input is refused at the check (load_config or prepare) with one line naming the file, line or key, and
the checks import nothing heavy, so that those lines print in a fraction of a second."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.candidates.resolve import describe
from tasks.config.schema import Merge, load_config
from tasks.core.errors import UserError
from tasks.data.load import MIN_TEST_ROWS
from tasks.plan.prepare import no_expected_warning, prepare
from tests.conftest import config_error as _error
from tests.conftest import mini_config_dict, write_jsonl
from tests.conftest import write_config as _write

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("prefect", "torch", "transformers", "mergekit", "pandas", "pyarrow", "datasets")
ROW = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "expected": "4"}


def _line_of(msg: str, path: Path) -> str:
    """The config line a `file:line: ...` message points at."""
    assert msg.startswith(f"{path}:"), msg
    return path.read_text().splitlines()[int(msg.split(":")[1]) - 1]


@pytest.fixture()
def cfg(tiny_models, tiny_data) -> dict:
    """A fresh miniature config dict to break."""
    return mini_config_dict(tiny_models, tiny_data)


def _with_test_rows(cfg: dict, tmp_path: Path, rows: list[dict], index: int = 1) -> Path:
    """Point datasets[index].test at a JSONL of `rows`, returning the file."""
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg["datasets"][index]["test"] = str(path)
    return path


# --- light imports -------------------------------------------------------------------------------------------


def _run_python(code: str) -> str:
    """stdout of `python -c code` in the repository root."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_checking_modules_import_nothing_heavy():
    code = ("import sys, tasks.config.schema, tasks.data.load, tasks.models.fingerprint, tasks.plan.prepare; "
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    assert _run_python(code) == ""


def test_a_dataset_error_prints_fast_without_heavy_imports(tmp_path, cfg):
    bad = _with_test_rows(cfg, tmp_path, [ROW, {"messages": [{"role": "user", "content": "hi"}]}])
    path = _write(tmp_path, cfg)
    code = f"""
import resource, sys
from tasks.config.schema import load_config
from tasks.core.errors import UserError
from tasks.plan.prepare import prepare
try:
    prepare(load_config({str(path)!r}))
except UserError as e:
    print(e)
use = resource.getrusage(resource.RUSAGE_SELF)
print(use.ru_utime + use.ru_stime)
print(' '.join(m for m in {HEAVY!r} if m in sys.modules))
"""
    lines = _run_python(code).splitlines()
    assert lines[0].startswith(f"{bad}:2: no assistant message")
    assert float(lines[1]) < 2.0  # CPU seconds, measured ~0.2
    assert len(lines) == 2  # no heavy module loaded (the third line is empty)


# --- names ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where, bad, why",
    [
        (("name",), "../../../escape-run", "contains '/'"),
        (("candidates", 0, "name"), "", "is empty"),
        (("candidates", 1, "name"), "be\\ta", "contains '\\\\'"),
        (("merges", 0, "name"), "..", "starts with '.'"),
        (("datasets", 0, "name"), ".hidden", "starts with '.'"),
        (("datasets", 1, "name"), "a..b", "contains '..'"),
        (("validation", "dataset", "name"), "tab\there", "contains '\\t'"),
        (("name",), "x" * 65, "is 65 characters long"),
    ],
)
def test_names_that_would_become_bad_paths(tmp_path, cfg, where, bad, why):
    node = cfg
    for part in where[:-1]:
        node = node[part]
    node[where[-1]] = bad
    path = _write(tmp_path, cfg)
    with pytest.raises(UserError) as info:
        load_config(path)
    msg = str(info.value)
    key = ".".join(map(str, where))
    assert f": {key}: " in msg and why in msg and "letters, digits" in msg and "\n" not in msg
    assert f"{where[-1]}:" in _line_of(msg, path)


def test_reference_name_is_checked_too(tmp_path, cfg):
    cfg["references"] = [{"name": "gpt/4", "model": "gpt-4"}]
    msg = _error(_write(tmp_path, cfg))
    assert "references.0.name: 'gpt/4' contains '/'" in msg


def test_reserved_teacher_name(tmp_path, cfg):
    cfg["candidates"][1]["name"] = "teacher"
    cfg["merges"] = []
    assert "'teacher' is reserved" in _error(_write(tmp_path, cfg))


def test_ordinary_names_pass(tmp_path, cfg):
    cfg["name"] = "my_search-2.0"
    cfg["datasets"][0]["name"] = "Extraction_v2.1"
    assert load_config(_write(tmp_path, cfg)).name == "my_search-2.0"


# --- merge recipes -------------------------------------------------------------------------------------------


def test_unknown_merge_method(tmp_path, cfg):
    cfg["merges"][0]["recipe"]["merge_method"] = "frobnicate"
    msg = _error(_write(tmp_path, cfg))
    assert msg.startswith("merge 'alpha-beta': recipe.merge_method: mergekit has no method 'frobnicate'")
    assert "slerp" in msg  # the known methods are listed


def test_misspelt_merge_method_gets_a_hint(tmp_path, cfg):
    cfg["merges"][0]["recipe"]["merge_method"] = "slurp"
    assert "did you mean 'slerp'?" in _error(_write(tmp_path, cfg))


def test_recipe_models_as_a_string(tmp_path, cfg):
    cfg["merges"][0]["recipe"]["models"] = "alpha"
    path = _write(tmp_path, cfg)
    msg = _error(path)
    assert "merges.0.recipe: models: should be a list of {model: NAME} entries, not str 'alpha'" in msg
    assert "recipe:" in _line_of(msg, path)


@pytest.mark.parametrize(
    "recipe, expected",
    [
        ({"models": ["alpha", "beta"]}, "models[0]: should be a mapping like {model: NAME}, not 'alpha'"),
        ({"merge_method": None}, "merge_method: missing"),
        ({"slices": "alpha"}, "slices: should be a list of {sources: [...]} entries"),
    ],
)
def test_recipe_shapes(tmp_path, cfg, recipe, expected):
    cfg["merges"][0]["recipe"] |= recipe
    if "slices" in recipe:
        del cfg["merges"][0]["recipe"]["models"]
    assert expected in _error(_write(tmp_path, cfg))


def test_validate_recipe_refuses_a_bad_shape_made_in_code():
    from tasks.models.merge import validate_recipe

    merge = Merge.model_construct(name="m", recipe={"merge_method": "slerp", "models": "alpha"})  # skips the checks
    with pytest.raises(UserError, match=r"^merge 'm': recipe.models: should be a list"):
        validate_recipe(merge, {"alpha": "/alpha"})


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"parameters": {}}, "recipe.parameters.t: merge method 'slerp' needs it"),
        ({"base_model": None}, "merge method 'slerp': Merge method requires a base input"),
        ({"merge_method": "linear", "parameters": {}}, "needs parameter 'weight' for model 'alpha'"),
    ],
)
def test_recipe_checked_against_the_method(tmp_path, cfg, change, expected):
    recipe = cfg["merges"][0]["recipe"]
    recipe |= change
    recipe = {k: v for k, v in recipe.items() if v is not None}
    cfg["merges"][0]["recipe"] = recipe
    assert expected in _error(_write(tmp_path, cfg))


def test_merge_errors_come_after_dataset_errors(tmp_path, cfg):
    cfg["merges"][0]["recipe"]["merge_method"] = "frobnicate"
    bad = _with_test_rows(cfg, tmp_path, [{"messages": []}])
    assert _error(_write(tmp_path, cfg)).startswith(f"{bad}:1:")


# --- files that are not what they claim ----------------------------------------------------------------------


def test_non_utf8_jsonl_names_file_and_line(tmp_path, cfg):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps(ROW).encode() + b"\n" + '{"messages": "caf\u00e9"}\n'.encode("latin-1"))
    cfg["datasets"][0]["train"] = str(bad)
    msg = _error(_write(tmp_path, cfg))
    assert msg == f"{bad}:2: not UTF-8 text (byte 0xe9 at column 18); save the file as UTF-8"


def test_non_utf8_config_names_file_and_line(tmp_path, cfg):
    path = _write(tmp_path, cfg)
    path.write_bytes(path.read_bytes().replace(b"name: mini", b"name: mini\xff", 1))
    msg = _error(path)
    assert msg.startswith(f"{path}:1: not UTF-8 text (byte 0xff at column 11)")


def test_parquet_that_is_not_parquet(tmp_path, cfg):
    fake = tmp_path / "rows.parquet"
    fake.write_text(json.dumps(ROW) + "\n")
    cfg["datasets"][0]["test"] = str(fake)
    assert _error(_write(tmp_path, cfg)).startswith(f"{fake}: not a Parquet file")


def test_damaged_parquet(tmp_path, cfg):
    fake = tmp_path / "rows.parquet"
    fake.write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")
    cfg["datasets"][0]["test"] = str(fake)
    assert _error(_write(tmp_path, cfg)).startswith(f"{fake}: cannot read this Parquet file (")


def test_folder_that_is_not_a_datasets_folder(tmp_path, cfg):
    folder = tmp_path / "rows"
    folder.mkdir()
    (folder / "rows.jsonl").write_text(json.dumps(ROW) + "\n")
    cfg["datasets"][0]["train"] = str(folder)
    assert _error(_write(tmp_path, cfg)).startswith(f"{folder}: a folder, but not a Hugging Face `datasets` folder")


def test_datasets_dict_folder_points_at_a_split(tmp_path, cfg):
    folder = tmp_path / "dd"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    cfg["datasets"][0]["train"] = str(folder)
    assert f"splits train, test; point train and test at one split's folder, e.g. {folder / 'train'}" in _error(
        _write(tmp_path, cfg))


def test_messages_text_that_is_not_json(tmp_path):
    from tasks.data.load import _check_row

    with pytest.raises(UserError, match=r"^x:3: 'messages' is text but not JSON"):
        _check_row({"messages": "[{oops"}, "x", 3)


# --- numbers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "section, key, value",
    [("finetune", "epochs", float("inf")), ("finetune", "epochs", float("nan")),
     ("finetune", "learning_rate", float("inf")), ("rating", "anchor_rating", float("-inf")),
     ("budget", "max_usd", float("nan")), ("judge", "timeout_s", float("inf"))],
)
def test_infinite_and_nan_floats(tmp_path, cfg, section, key, value):
    cfg.setdefault(section, {})[key] = value
    path = _write(tmp_path, cfg)
    assert (".inf" if value == value else ".nan") in path.read_text()
    msg = _error(path)
    assert f"{section}.{key}: Input should be a finite number" in msg and key in _line_of(msg, path)


def test_infinite_price(tmp_path, cfg):
    cfg["prices"] = {"gpt-4": {"input": float("inf"), "output": 1.0}}
    assert "prices.gpt-4.input: Input should be a finite number" in _error(_write(tmp_path, cfg))


# --- rows ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages, expected",
    [
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}],
         "the assistant answer (the last message) is empty; there is nothing to learn"),
        ([{"role": "system", "content": "be brief"}, {"role": "assistant", "content": "ok"}],
         "no user message before the assistant answer (the prompt needs a user turn)"),
    ],
)
def test_rows_that_teach_nothing(tmp_path, cfg, messages, expected):
    bad = _with_test_rows(cfg, tmp_path, [ROW] * 2 + [{"messages": messages}] + [ROW] * 3)
    assert _error(_write(tmp_path, cfg)) == f"{bad}:3: {expected}"


def test_prompts_longer_than_max_length(tmp_path, cfg):
    cfg["finetune"]["max_length"] = 8  # the tiny rows' prompts are 150+ bytes: surely over 8 tokens
    msg = _error(_write(tmp_path, cfg))
    assert msg.startswith(f"{cfg['datasets'][0]['train']}:1: the prompt alone is at least ")
    assert "finetune.max_length is 8: no token of the answer would be trained; raise finetune.max_length" in msg


def test_prompts_that_fit_pass(tmp_path, cfg):
    cfg["finetune"]["max_length"] = 128
    assert len(prepare(load_config(_write(tmp_path, cfg))).datasets) == 2


def test_absurd_test_row(tmp_path, cfg):
    huge = {"messages": [{"role": "user", "content": "x" * (1 << 20)}, {"role": "assistant", "content": "y"}]}
    bad = _with_test_rows(cfg, tmp_path, [ROW] * 5 + [huge])
    msg = _error(_write(tmp_path, cfg))
    assert msg == (f"{bad}:6: the row is at least 174764 tokens, over 8x finetune.max_length (128); it looks broken "
                   "(fix or drop it), or raise finetune.max_length")


@pytest.mark.parametrize("held_out", [False, True])
def test_test_split_too_small(tmp_path, cfg, held_out):
    bad = write_jsonl(tmp_path / "one.jsonl", [ROW])
    (cfg["validation"]["dataset"] if held_out else cfg["datasets"][0])["test"] = str(bad)
    msg = _error(_write(tmp_path, cfg))
    assert msg.startswith(f"{bad}: the test split has 1 row(s), fewer than {MIN_TEST_ROWS}: ratings' confidence")


def test_missing_expected_is_a_warning_for_the_metric_judge(tmp_path, cfg):
    rows = [{"messages": ROW["messages"]}] * 6
    _with_test_rows(cfg, tmp_path, rows, index=0)
    config = load_config(_write(tmp_path, cfg))
    warnings = prepare(config).warnings
    assert len(warnings) == 1 and warnings[0].startswith("dataset 'extraction': 6 of 6 test rows have no \"expected\"")
    assert "the teacher cannot lose" in warnings[0]
    llm = config.model_copy(update={"judge": config.judge.model_copy(update={"kind": "openai"})})
    assert no_expected_warning(config.datasets[0], prepare(config).datasets["extraction"].test, llm) == []


def test_data_with_expected_gives_no_warning(tmp_path, cfg):
    assert prepare(load_config(_write(tmp_path, cfg))).warnings == []


# --- model folders -------------------------------------------------------------------------------------------


def _broken_copy(tmp_path: Path, cfg: dict, tiny_models: dict, breaks) -> Path:
    """Copy model beta, break the copy with `breaks(folder)`, and make candidate beta point at it."""
    folder = tmp_path / "beta-copy"
    shutil.copytree(tiny_models["beta"], folder)
    breaks(folder)
    cfg["candidates"][1]["path"] = str(folder)
    return folder


def _truncate(f: Path) -> None:
    """Cut the last 100 bytes off a file."""
    data = f.read_bytes()
    f.write_bytes(data[:-100])


@pytest.mark.parametrize(
    "breaks, expected",
    [
        (lambda d: (d / "tokenizer.json").unlink(), "has no tokenizer (none of tokenizer.json"),
        (lambda d: (d / "config.json").unlink(), "has no config.json"),
        (lambda d: (d / "model.safetensors").unlink(), "has no weights"),
        (lambda d: (d / "model.safetensors").write_bytes(b"<html>404 not found</html>"),
         "does not start with a safetensors header"),
        (lambda d: (d / "model.safetensors").write_bytes(struct.pack("<Q", 5) + b"nope!" + b"\0" * 8),
         "its header is not JSON"),
        (lambda d: _truncate(d / "model.safetensors"), "is cut short"),
    ],
)
def test_broken_model_folder(tmp_path, cfg, tiny_models, breaks, expected):
    folder = _broken_copy(tmp_path, cfg, tiny_models, breaks)
    msg = _error(_write(tmp_path, cfg))
    assert msg.startswith(f"candidate 'beta': {folder}") and expected in msg


def _safetensors(path: Path, n: int) -> Path:
    """A valid safetensors file holding one uint8 tensor of n bytes."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(range(256)) * (n // 256))
    return path


def test_fingerprint_hashes_every_byte_and_caches(tmp_path, cfg, tiny_models, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    big = _broken_copy(tmp_path, cfg, tiny_models, lambda d: _safetensors(d / "extra.safetensors", 3 << 20))
    config = load_config(_write(tmp_path, cfg))
    first = describe(config.candidates[1]).fingerprint
    cache = json.loads((tmp_path / "cache" / "basesearch" / "hashes.json").read_text())
    assert any(k.endswith("extra.safetensors") for k in cache)  # the 3 MiB file is cached, small ones are not

    real = hashlib.file_digest

    def small_files_only(fh, digest):
        assert not fh.name.endswith("extra.safetensors"), "the big file was hashed again"
        return real(fh, digest)

    with monkeypatch.context() as m:  # a cache hit reads none of the big file's bytes
        m.setattr(hashlib, "file_digest", small_files_only)
        assert describe(config.candidates[1]).fingerprint == first

    (tmp_path / "cache" / "basesearch" / "hashes.json").write_text("{not json")  # a corrupt cache is ignored
    assert describe(config.candidates[1]).fingerprint == first

    f = big / "extra.safetensors"  # one byte in the middle: the old first/last MiB fingerprint missed it
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000))
    assert describe(config.candidates[1]).fingerprint != first


# --- the command line ----------------------------------------------------------------------------------------


def test_cli_refuses_an_escaping_search_name(tmp_path, cfg):
    cfg["name"] = "../../../escape-run"
    path = _write(tmp_path, cfg)
    proc = subprocess.run([sys.executable, "-m", "flows.search", "--config", str(path), "--store", str(tmp_path / "s")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "name: '../../../escape-run' contains '/'" in lines[0]
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").rglob("*escape-run*"))


def test_a_misspelt_anchor_is_refused_when_the_config_is_read(tmp_path, cfg):
    cfg["rating"]["anchor"] = "alpah"
    assert "rating.anchor: 'alpah' is not a contender; did you mean 'alpha'?" in _error(_write(tmp_path, cfg))
