"""Export a finished run's winner ready to serve, and check it is what was judged:

    python -m flows.export --run RUN_ID [--dataset NAME] [--merged] --out DIR [--store DIR] [--check vllm]

Writes DIR: the LoRA adapter (or with --merged full weights), the tokenizer with its chat template, and a model card
(README.md) with the vllm serve and transformers commands. --check vllm starts the card's own vllm serve command
(BASESEARCH_VLLM_PYTHON names the python that has vLLM) and compares its answers with the search's. The Python API
is tasks/export/export.py; the Prefect flow `export` below runs it from the UI.
"""

from __future__ import annotations

import argparse
from typing import Any

from flows.command import Parser, one_line_errors
from tasks.core.errors import EnvironmentFailure
from tasks.export.export import CheckFailed, export_run


def _parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = Parser(prog="python -m flows.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, metavar="RUN_ID", help="the run to export (LATEST: the newest)")
    p.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder for the export")
    p.add_argument("--dataset", default=None, metavar="NAME",
                   help="export the best fine-tune on this dataset, and its adapter (default: the pooled winner's "
                        "adapter on the config's first dataset)")
    p.add_argument("--model", default=None, metavar="NAME", help="export this fine-tuned model instead of the winner")
    p.add_argument("--merged", action="store_true", help="full weights with the adapter merged in (default: the adapter)")
    p.add_argument("--store", default=None, metavar="DIR", help="the search's store (default: $BASESEARCH_STORE or ./store)")
    p.add_argument("--force", action="store_true",
                   help="export a model the search found had learned nothing (it beat no floor on any dataset)")
    p.add_argument("--check", default="transformers", choices=["transformers", "vllm"], metavar="ENGINE",
                   help="answer the test rows with this engine and compare with the search's outputs: transformers "
                        "(default), or vllm: the model card's own `vllm serve` command, asked through the openai "
                        "client (BASESEARCH_VLLM_PYTHON: the python that has vLLM)")
    p.add_argument("--no-compare", action="store_true",
                   help="with --check vllm: skip serving the other form (the merged weights for an adapter, the "
                        "adapter for --merged) to measure which to deploy")
    p.add_argument("--no-check", action="store_true",
                   help="skip reloading the export and answering the test rows to compare with the search's outputs")
    return p


def main(argv: list[str] | None = None) -> int:
    """Export, print what was written and the check's line, the serve command, and the folder last."""
    def export() -> int:
        """Parse, export, print."""
        args = _parser().parse_args(argv)
        result = export_run(args.run, args.out, store=args.store, dataset=args.dataset, merged=args.merged,
                            check=not args.no_check, model=args.model, log=print, force=args.force,
                            engine=args.check, compare_forms=not args.no_compare)
        print(f"serve: {result['serve']}")
        print(result["out"])
        return 0

    return one_line_errors(export, failures=(CheckFailed, EnvironmentFailure))


if __name__ == "__main__":
    raise SystemExit(main())

# Below the command line: it never waits for Prefect's import.
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.failures import one_line_failures


@flow(name="export", flow_run_name="export-{run}", log_prints=False)
@one_line_failures  # a user's mistake: Failed with its one line, no traceback
def export(run: str, out: str, dataset: str | None = None, merged: bool = False, store: str | None = None,
           check: bool = True, model: str | None = None, force: bool = False,
           check_engine: str = "transformers", compare_forms: bool = True) -> dict[str, Any]:
    """Export run `run`'s winner (or `model`) into the new folder `out` on the worker, checked against the search's
    outputs in `check_engine` (transformers, or vllm: the card's own server, with BASESEARCH_VLLM_PYTHON set on the
    worker; `compare_forms`: also serve the other form, to measure which to deploy); the model card becomes the
    `export` artifact. `store` defaults to $BASESEARCH_STORE, else ./store."""
    result = export_run(run, out, store=store, dataset=dataset, merged=merged, check=check, model=model,
                        log=get_run_logger().info, force=force, engine=check_engine, compare_forms=compare_forms)
    create_markdown_artifact(result["card"], key="export", description=f"Export of {result['model']}, run {result['run_id']}")
    get_run_logger().info(f"export written to {result['out']}")
    return {k: v for k, v in result.items() if k != "card"}
