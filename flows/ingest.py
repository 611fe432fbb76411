"""Turn production traffic (logged chat-completion requests) or existing fine-tuning rows into clean datasets:

    python -m flows.ingest SOURCE --out DIR [--group-by metadata.thread_id] [--model M] [--since T] ...
    python -m flows.ingest relabel DIR --model M [--base-url URL] [--mode regenerate|revise --instructions FILE]

Writes DIR/train.jsonl and DIR/test.jsonl (the OpenAI fine-tuning format the search reads, each row with a stable
id, its source ids and its split group), DIR/ingest.json (the manifest: source, options, window, counts at every
step, sha256 of the outputs) and DIR/ingest.md (what was kept, dropped and changed). Same source and options, same
bytes. `relabel` asks a stronger model for new answers to an ingest folder's rows and writes them beside the
originals (DIR/train.relabeled.jsonl, DIR/relabel.json). The steps are described in docs/ingest.md; the Python API is tasks/ingest/ingest.py run_ingest, and the
Prefect flow `ingest` below runs it from the UI.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pydantic import ValidationError

from flows.command import Parser, one_line_errors
from tasks.core.errors import UserError
from tasks.ingest.config import IngestConfig, RelabelConfig

# Option name -> IngestConfig field for the options given as they are (flags and renamed ones are mapped in _config).
PLAIN = ("since", "until", "group_by", "test_share", "held_out_share", "near_threshold", "shingle_words",
         "phone_region", "static_share", "max_unreadable", "examples", "base_url", "api_key_env", "api_key_secret",
         "page_size", "concurrency")


def _parser() -> argparse.ArgumentParser:
    """Command-line options (their defaults are IngestConfig's)."""
    d = IngestConfig.model_fields
    p = Parser(prog="python -m flows.ingest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="JSONL of logged requests, JSONL or Parquet of fine-tuning rows, "
                   "a folder of such files, or openai:stored-completions (the store=true traffic at --base-url)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the outputs (new, empty, or an earlier "
                   "ingest's)")
    p.add_argument("--model", action="append", default=[], metavar="NAME", help="keep requests to this model "
                   "(repeatable; its dated snapshots count)")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                   help="keep rows whose metadata KEY (dotted for nested) is VALUE (repeatable: all must hold)")
    p.add_argument("--since", metavar="TIME", help="keep requests at or after this ISO time (UTC without a zone)")
    p.add_argument("--until", metavar="TIME", help="keep requests before this ISO time")
    p.add_argument("--group-by", metavar="PATH", help="dotted path of the conversation id, e.g. metadata.thread_id: "
                   "a thread never straddles the split (default: near-duplicate clusters)")
    p.add_argument("--test-share", type=float, default=d["test_share"].default, metavar="X",
                   help="share of the groups in test.jsonl (default %(default)s)")
    p.add_argument("--held-out-share", type=float, default=d["held_out_share"].default, metavar="X",
                   help="share of the groups carved out to held_out.jsonl (default 0: none)")
    p.add_argument("--no-exact-dedup", action="store_true", help="keep exact duplicates (grouped in the split)")
    p.add_argument("--no-near-dedup", action="store_true", help="keep near-duplicates (grouped in the split)")
    p.add_argument("--near-threshold", type=float, default=d["near_threshold"].default, metavar="J",
                   help="Jaccard similarity of near-duplicates (default %(default)s)")
    p.add_argument("--shingle-words", type=int, default=d["shingle_words"].default, metavar="N",
                   help="words per n-gram of the near-duplicate check (default %(default)s)")
    p.add_argument("--keep-pii", action="store_true", help="only count personal data and secrets, do not replace them")
    p.add_argument("--phone-region", default=d["phone_region"].default, metavar="CC",
                   help="region of national phone formats (default %(default)s)")
    p.add_argument("--prune-static", action="store_true",
                   help="remove the static system prompt from the rows, into DIR/static_prompt.txt")
    p.add_argument("--static-share", type=float, default=d["static_share"].default, metavar="X",
                   help="share of rows from which a system prompt is static (default %(default)s)")
    p.add_argument("--drop-tool-calls", action="store_true",
                   help="drop rows with tool calls or tool results (default: kept as JSON text)")
    p.add_argument("--max-unreadable", type=float, default=d["max_unreadable"].default, metavar="X",
                   help="largest share of unreadable lines skipped (default %(default)s)")
    p.add_argument("--examples", type=int, default=d["examples"].default, metavar="N",
                   help="examples per kind in ingest.md (default %(default)s)")
    api = p.add_argument_group("openai:stored-completions")
    api.add_argument("--base-url", metavar="URL", help="OpenAI-compatible endpoint (default: OpenAI's)")
    api.add_argument("--api-key-env", default=d["api_key_env"].default, metavar="VAR",
                     help="environment variable holding the API key (default %(default)s)")
    api.add_argument("--api-key-secret", metavar="BLOCK", help="Prefect Secret block holding it, when VAR is unset")
    api.add_argument("--page-size", type=int, default=d["page_size"].default, metavar="N",
                     help="completions and messages per page (1-100, default %(default)s)")
    api.add_argument("--concurrency", type=int, default=d["concurrency"].default, metavar="N",
                     help="completions whose messages are fetched at once (default %(default)s)")
    return p


def _metadata(pairs: list[str]) -> dict[str, str]:
    """KEY=VALUE options as a dict; a pair without '=' is a usage mistake."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--metadata {pair}: expected KEY=VALUE, e.g. --metadata app=support")
        out[key] = value
    return out


def _relabel_parser() -> argparse.ArgumentParser:
    """Options of `relabel` (their defaults are RelabelConfig's)."""
    d = RelabelConfig.model_fields
    p = Parser(prog="python -m flows.ingest relabel", description="Ask a stronger model for new answers to an ingest "
               "folder's rows; written beside the originals as SPLIT.relabeled.jsonl, with relabel.json.")
    p.add_argument("folder", metavar="DIR", help="an ingest folder (python -m flows.ingest --out DIR)")
    p.add_argument("--model", required=True, metavar="M", help="the stronger model, as the endpoint names it")
    p.add_argument("--base-url", metavar="URL", help="OpenAI-compatible endpoint (default: OpenAI's)")
    p.add_argument("--api-key-env", default=d["api_key_env"].default, metavar="VAR",
                   help="environment variable holding the API key (default %(default)s)")
    p.add_argument("--api-key-secret", metavar="BLOCK", help="Prefect Secret block holding it, when VAR is unset")
    p.add_argument("--mode", choices=("regenerate", "revise"), default=d["mode"].default,
                   help="answer afresh, or rewrite the original answer as --instructions say (default %(default)s)")
    p.add_argument("--instructions", metavar="FILE", help="text file: how to revise (or, regenerating, a system "
                   "message put first)")
    p.add_argument("--split", action="append", choices=("train", "test", "held_out"), dest="splits",
                   help="file of the folder to relabel (repeatable; default: train)")
    p.add_argument("--max-tokens", type=int, default=d["max_tokens"].default, metavar="N",
                   help="longest new answer (default %(default)s)")
    p.add_argument("--price-input", type=float, metavar="USD", help="USD per 1M prompt tokens of the model")
    p.add_argument("--price-output", type=float, metavar="USD", help="USD per 1M completion tokens of the model")
    p.add_argument("--max-usd", type=float, metavar="USD", help="stop before spending this much (needs the prices)")
    p.add_argument("--concurrency", type=int, default=d["concurrency"].default, metavar="N",
                   help="requests in flight (default %(default)s)")
    p.add_argument("--rpm", type=int, metavar="N", help="requests-per-minute limit of the endpoint")
    return p


def _validated(model: type[Any], fields: dict[str, Any]) -> Any:
    """A config model built from option values; a bad value is one line naming the option."""
    try:
        return model(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        # a check across options (the window, the shares) names the option its message starts with
        field = str(err["loc"][0] if err["loc"] else msg.split(":", 1)[0].split(" ", 1)[0])
        raise UserError(f"--{field.replace('_', '-')}: {msg.removeprefix(f'{field}: ')}") from None


def _relabel_config(args: argparse.Namespace) -> RelabelConfig:
    """The relabel options as a RelabelConfig."""
    fields = {k: v for k, v in vars(args).items() if v is not None}
    return _validated(RelabelConfig, {**fields, "splits": tuple(dict.fromkeys(args.splits or ("train",)))})


def _config(args: argparse.Namespace) -> IngestConfig:
    """The options as an IngestConfig; a bad value is one line naming the option."""
    fields: dict[str, Any] = {k: getattr(args, k) for k in PLAIN if getattr(args, k) is not None}
    fields |= {"source": args.source, "out": args.out, "models": tuple(args.model),
               "metadata": _metadata(args.metadata), "exact_dedup": not args.no_exact_dedup,
               "near_dedup": not args.no_near_dedup, "scrub_pii": not args.keep_pii, "prune_static": args.prune_static,
               "tool_calls": "drop" if args.drop_tool_calls else "keep"}
    return _validated(IngestConfig, fields)


def main(argv: list[str] | None = None) -> int:
    """Ingest, print the plan, the counts and the output folder last."""
    def ingest_command() -> int:
        """Parse, ingest (or relabel), print."""
        args = sys.argv[1:] if argv is None else argv
        if args[:1] == ["relabel"]:
            from tasks.ingest.relabel import run_relabel

            relabel = _relabel_config(_relabel_parser().parse_args(args[1:]))
            run_relabel(relabel, log=print)
            print(relabel.folder)
            return 0
        from tasks.ingest.ingest import run_ingest

        cfg = _config(_parser().parse_args(args))
        run_ingest(cfg, log=print)
        print(cfg.out)
        return 0

    return one_line_errors(ingest_command)


if __name__ == "__main__":
    raise SystemExit(main())

# Below the command line: it never waits for Prefect's import.
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.failures import one_line_failures


@flow(name="ingest", flow_run_name="ingest-{config.source}", log_prints=False)
@one_line_failures  # a user's mistake: Failed with its one line, no traceback
def ingest(config: IngestConfig) -> dict[str, Any]:
    """Ingest `config.source` into `config.out` on the worker (paths relative to its working folder); the report
    ingest.md becomes the `ingest` artifact, and the manifest is returned."""
    from pathlib import Path

    from tasks.ingest.ingest import run_ingest

    manifest = run_ingest(config, log=get_run_logger().info)
    create_markdown_artifact((Path(config.out) / "ingest.md").read_text(encoding="utf-8"), key="ingest",
                             description=f"Ingest of {config.source}")
    return manifest


@flow(name="relabel", flow_run_name="relabel-{config.folder}", log_prints=False)
@one_line_failures
def relabel(config: RelabelConfig) -> dict[str, Any]:
    """New answers from a stronger model for an ingest folder's rows, written beside the originals on the worker
    (SPLIT.relabeled.jsonl and relabel.json); the key is read from the worker's environment or a Secret block, never
    from the run's parameters. Returns relabel.json's record."""
    from tasks.ingest.relabel import run_relabel

    return run_relabel(config, log=get_run_logger().info)
