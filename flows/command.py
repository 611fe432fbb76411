"""What every command of the package shares: usage mistakes and failures said in one `error:` line, no traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from tasks.core.errors import EnvironmentFailure, UserError


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one `error:` line and exit 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message)


def one_line_errors(command: Callable[[], int], failures: tuple[type[Exception], ...] = (EnvironmentFailure,),
                    os_error_code: int = 1) -> int:
    """Run a command: a user's mistake prints one line and exits 2; a failure (`failures`, or the file system's
    OSError) prints one line and exits 1 (or `os_error_code`)."""
    try:
        return command()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except failures as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return os_error_code
