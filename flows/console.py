"""The `basesearch` console command: `basesearch search|rank|export|ingest ...` is `python -m flows.<command> ...`."""

from __future__ import annotations

import sys

USAGE = """usage: basesearch COMMAND [options]

commands:
  search   run a search (the demo without --config): python -m flows.search
  rank     re-rate existing judgments without touching any model: python -m flows.rank
  export   write a finished run's winner ready to serve: python -m flows.export
  ingest   production traffic or fine-tuning rows to clean datasets: python -m flows.ingest

`basesearch COMMAND --help` lists a command's options."""


def main() -> None:
    """Hand the command line to the command it names."""
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if len(sys.argv) >= 2 else 2)
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "search":
        from flows.cli import run_command

        sys.argv = ["basesearch search", *rest]
        run_command()  # leaves the process itself, as python -m flows.search does
    elif command == "rank":
        from flows.rank import main as rank

        raise SystemExit(rank(rest))
    elif command == "export":
        from flows.export import main as export

        raise SystemExit(export(rest))
    elif command == "ingest":
        from flows.ingest import main as ingest

        raise SystemExit(ingest(rest))
    print(f"error: basesearch: no command '{command}' (search, rank, export, ingest)", file=sys.stderr)
    raise SystemExit(2)
