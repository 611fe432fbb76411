"""A user's mistake ends a flow run in one line: Failed, with the message as the state's, and no traceback.

A flow that raised would leave two tracebacks in the Prefect UI's log of a run started from the UI (the engine's
"Encountered exception during execution" and the worker process's "Engine execution exited with unexpected
exception"), for what the command line says in one line (flows/cli.py). A flow wrapped in one_line_failures
instead returns a Failed state carrying the message (and the exception, so a caller of the flow function, such as
the command line, still gets the UserError to print), logs the one line, and the process's last record of it
leaves its traceback out. A bug of ours keeps every traceback.
"""

from __future__ import annotations

import functools
import inspect
import logging
import typing
from typing import Any, Callable, TypeVar

from tasks.core.errors import EnvironmentFailure, UserError

ONE_LINE = (UserError, EnvironmentFailure)  # failures said in one line; anything else is a bug, with its traceback
MARK = "basesearch_one_line"  # log record attribute: this record is the one line of such a failure
F = TypeVar("F", bound=Callable[..., Any])


def one_line_failures(fn: F) -> F:
    """Wrap a flow's function: a UserError or EnvironmentFailure becomes a Failed state with its message."""

    @functools.wraps(fn)
    def body(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ONE_LINE as e:
            from prefect import get_run_logger
            from prefect.states import Failed

            get_run_logger().error(f"error: {e}", extra={MARK: True})
            return Failed(message=str(e), data=e)  # data: the flow function's caller gets `e` raised

    # Prefect builds the run form and validates parameters from the signature: give it `fn`'s, with the annotations
    # resolved in `fn`'s module (this module's globals do not know its types)
    body.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]
    body.__annotations__ = typing.get_type_hints(fn)
    return body  # type: ignore[return-value]


def is_one_line(exc: BaseException | None) -> bool:
    """True for a failure said in one line (a Prefect FailedRun wrapping one counts too)."""
    return isinstance(exc, ONE_LINE)


class DropOneLineTracebacks(logging.Filter):
    """Leave out a flow-run record whose traceback is a one-line failure's: that run has logged its line already.

    On a worker the engine re-raises a Failed state's exception once the flow has returned, and logs "Engine
    execution exited with unexpected exception" with its traceback to the run's log (prefect.flow_engine.run_flow).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a record that carries a one-line failure's traceback."""
        return not is_one_line(record.exc_info[1] if record.exc_info else None)


def install() -> None:
    """Put the filter on Prefect's flow-run logger once (it reaches the UI through that logger's handlers)."""
    logger = logging.getLogger("prefect.flow_runs")
    if not any(isinstance(f, DropOneLineTracebacks) for f in logger.filters):
        logger.addFilter(DropOneLineTracebacks())


install()
