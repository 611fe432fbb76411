"""Generation throughput: ours (length-sorted, left-padded batches, KV cache, stop at EOS; tasks.generate.outputs.generate)
against plain batched `model.generate` (same batch size, rows in dataset order, no length sorting: the peer's usual
loop) and against one example at a time; same base + adapter (merged), greedy outputs compared.

The model is the demo zoo's tiny Mistral shape with random weights (larger init so greedy argmaxes are clear),
with a LoRA adapter trained for a few steps; the test rows are every demo test split.

python bench/generate_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench._machine import header, table  # noqa: E402
from tasks.config.stages import FinetuneConfig, GenerateConfig  # noqa: E402
from tasks.data.load import load_examples  # noqa: E402
from tasks.demo.zoo import SHAPE, build_tokenizer  # noqa: E402
from tasks.generate.outputs import generate  # noqa: E402
from tasks.train.finetune import finetune  # noqa: E402


def make_model(folder: Path, tok) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, sliding_window=None,
                        initializer_range=0.3, **SHAPE)
    MistralForCausalLM(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def plain_batched(model_dir: Path, adapter: Path, examples: list, max_new: int, batch: int) -> tuple[list[str], int]:
    """The peer's loop: the same merged model, prompts and stop tokens, batches of `batch` rows in dataset order,
    left-padded, one model.generate each; the adapter merge is timed, as it is in ours."""
    from tasks.compute.workers import threads_for, torch_threads
    from tasks.generate.outputs import cached_base, merged_adapter
    from tasks.models.chat import prompt_ids, strip_stop

    base, tok, fmt = cached_base(model_dir)
    answers, tokens = [], 0
    with merged_adapter(base, adapter) as model, torch_threads(threads_for(base.num_parameters())):
        tok.padding_side = "left"
        for start in range(0, len(examples), batch):
            enc = tok.pad({"input_ids": [prompt_ids(tok, fmt, e.prompt) for e in examples[start : start + batch]]},
                          return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, eos_token_id=list(fmt.stop_ids),
                                     pad_token_id=tok.pad_token_id, use_cache=True)
            for row in out[:, enc["input_ids"].shape[1] :]:
                ids, _ = strip_stop(row.tolist(), fmt)
                answers.append(tok.decode(ids, skip_special_tokens=True).strip())
                tokens += len(ids)
    return answers, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows and tokens (for the test)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see finetune_throughput)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    n_rows = 12 if a.quick else None
    max_new = 16 if a.quick else 48  # the demo config's max_new_tokens
    batch = 40  # the demo config's generation batch
    tok = build_tokenizer()
    examples = []
    for f in sorted((ROOT / "configs" / "demo_data").glob("*_test.jsonl")):
        examples += load_examples(f)
    examples = examples[:n_rows] if n_rows else examples
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp) / "model", tok)
        adapter = Path(tmp) / "adapter"
        adapter.mkdir()
        train = load_examples(ROOT / "configs" / "demo_data" / "extraction_train.jsonl")
        finetune(model_dir, train, FinetuneConfig(max_steps=4, batch_size=8, learning_rate=1e-2, max_length=256,
            search={"enabled": False}),
                 adapter)
        results, outs = [], {}
        plain_batched(model_dir, adapter, examples[:2], 4, batch)  # warm-up, as for ours
        t0, c0 = time.perf_counter(), time.process_time()
        outs["plain batched"], toks = plain_batched(model_dir, adapter, examples, max_new, batch)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        results.append({"mode": "plain batched model.generate", "batch": batch, "rows": len(examples),
                        "new tokens": toks, "seconds": f"{wall:.2f}", "tokens/s": f"{toks / wall:,.0f}",
                        "tokens/CPU-s": f"{toks / cpu:,.0f}", "_w": wall, "_c": cpu, "peak RSS": ""})
        for name, bs in [("batched", batch), ("one at a time", 1)]:
            generate(model_dir, adapter, "bench", examples[:2], "m", GenerateConfig(max_new_tokens=4, batch_size=bs))
            t0, c0 = time.perf_counter(), time.process_time()
            df = generate(model_dir, adapter, "bench", examples, "m", GenerateConfig(max_new_tokens=max_new, batch_size=bs))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            outs[name] = df["output"].tolist()
            toks = int(df["completion_tokens"].sum())
            results.append({"mode": name, "batch": bs, "rows": len(df), "new tokens": toks, "seconds": f"{wall:.2f}",
                            "tokens/s": f"{toks / wall:,.0f}", "tokens/CPU-s": f"{toks / cpu:,.0f}", "_w": wall,
                            "_c": cpu, "peak RSS": f"{df.attrs['peak_memory']['peak_rss_mb']:.0f} MB"})
    same = outs["batched"] == outs["one at a time"]
    same_plain = sum(a == b for a, b in zip(outs["batched"], outs["plain batched"]))
    results[1]["mode"] = "ours (length-sorted batches)"
    plain, single = results[0], results[2]
    for r in results:
        r["vs plain batched"] = f"{plain['_w'] / r['_w']:.2f}x"
        r["vs one at a time"] = f"{single['_w'] / r['_w']:.1f}x"
        r["vs plain batched (CPU time)"] = f"{plain['_c'] / r['_c']:.2f}x"
    print(f"Generation throughput: {len(examples)} demo test rows, greedy, max_new_tokens {max_new}, model {SHAPE} "
          f"+ LoRA adapter (merged), float32 on {'CUDA' if torch.cuda.is_available() else 'CPU'}; "
          f"identical outputs: {same}; plain batched gives the same answer on {same_plain} of {len(examples)} rows")
    print(header())
    print(table(results, ["mode", "batch", "rows", "new tokens", "seconds", "tokens/s", "vs plain batched",
                          "vs one at a time", "tokens/CPU-s", "vs plain batched (CPU time)", "peak RSS"]))
    if not same:
        raise SystemExit("batched and one-at-a-time outputs differ")


if __name__ == "__main__":
    main()
