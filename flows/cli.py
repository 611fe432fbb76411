"""The command line of `python -m flows.search`: check first, talk from the first second, fail in one line.

It reads and checks the config before anything heavy is imported (torch, transformers and Prefect cost ~5 s
of CPU, a minute on a loaded laptop), prints a first line at once, starts Prefect's temporary server in the
background while the checks and imports go on, and turns every failure that is not a bug of ours (bad input,
a server that will not start, a full disk, a killed worker) into one line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tasks.core.errors import EnvironmentFailure, UserError

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
SERVER_HINT = ("hint: start a server yourself (prefect server start) and point the search at it "
               "(prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api), then run the same command again")
INTERRUPTED = "interrupted: every result finished before it is in the store; run the same command to go on"
ENV_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
              errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}


def say(line: str) -> None:
    """One progress line on stderr, at once (the ranking and the report's path go to stdout)."""
    print(line, file=sys.stderr, flush=True)


class TemporaryServer:
    """Prefect's temporary local server, started in a background thread while the search checks and imports."""

    def __init__(self) -> None:
        """Start it now (Prefect's own SubprocessASGIServer: the flow then finds it running and uses it)."""
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        self.timeout_s = int(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())  # 600 s: see flows/__init__
        self.server = SubprocessASGIServer()
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._start, name="prefect-temporary-server", daemon=True)
        self.thread.start()

    def _start(self) -> None:
        """The blocking start, in the thread: waits until /health answers or the timeout passes."""
        try:
            self.server.start(timeout=self.timeout_s)
        except BaseException as e:  # noqa: BLE001 - reported by wait() in the main thread
            self.error = e

    def wait(self) -> None:
        """Return once the server answers; EnvironmentFailure at once when its process dies or it times out."""
        failed: set[int] = set()  # ids of server processes that exited with code 3
        while self.thread.is_alive():
            proc = self.server.server_process
            # Exit code 3 is uvicorn's "port taken": Prefect picks another port and starts again by itself. But uvicorn
            # also exits 3 when the app cannot start (e.g. its database cannot be opened), and then Prefect would
            # retry until the timeout: three such exits are a failure, not bad luck with ports.
            if proc is not None and proc.poll() is not None:
                if proc.returncode != 3 or len(failed | {id(proc)}) >= 3:
                    raise EnvironmentFailure(f"Prefect's temporary server exited with code {proc.returncode} while "
                                             f"starting{' (3 times)' if proc.returncode == 3 else ''}; {SERVER_HINT}")
                failed.add(id(proc))
            self.thread.join(0.2)
        if self.error is not None:
            raise EnvironmentFailure(f"Prefect's temporary server did not start within {self.timeout_s} s "
                                     f"({type(self.error).__name__}); {SERVER_HINT}")

    def stop(self) -> None:
        """Stop the server (started or still starting) and forget it, so a later search starts a fresh one."""
        deadline = time.monotonic() + 10.0
        # The thread launches the process a few milliseconds after it starts: stopping before that would let it
        # launch one after the stop, left running until exit.
        while self.server.server_process is None and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.server.stop()  # the thread's wait for /health then ends too
        self.thread.join(5.0)


def prefect_home() -> None:
    """Make sure PREFECT_HOME (the temporary server's database lives there) exists, or say why it cannot in one line;
    Prefect itself creates only its last folder, and its server then fails to open the database."""
    from prefect.settings import PREFECT_HOME

    home = Path(PREFECT_HOME.value()).expanduser()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EnvironmentFailure(f"PREFECT_HOME {home}: cannot create it ({e.strerror}); set PREFECT_HOME to a "
                                 "writable folder") from None


def stop_temporary_server() -> None:
    """Stop Prefect's temporary local server now rather than at exit, so its goodbye line is not printed last."""
    server_mod = sys.modules.get("prefect.server.api.server")  # not imported: no server was started
    if server_mod is None:
        return
    _drain_prefect()  # send queued log lines and events while the server is still there to take them
    for server in list(server_mod.SubprocessASGIServer._instances.values()):
        server.stop()


def _drain_prefect() -> None:
    """Send Prefect's queued log lines and events now (at most 10 s each), as its own exit handlers would."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=10)


def run_command() -> None:
    """`python -m flows.search`: main(), then leave without Python's teardown.

    Tearing down torch, transformers and Prefect object by object took 2.3 s after the report's path was printed,
    idle (at load 7, 22 s passed between the flow's end and the command's exit). Nothing is lost by skipping it: every result is written (atomically), Prefect's
    log lines and events are sent first, and the temporary server and the worker processes are stopped.
    """
    code = main()
    stop_temporary_server()  # drains first; already done after a search that finished
    if "tasks.compute.workers" in sys.modules:
        sys.modules["tasks.compute.workers"].stop_workers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_on_interrupt(signum: int, frame: Any) -> None:
    """Ctrl-C with Prefect's temporary server: say what is kept, stop the workers and the server, exit at once.

    Ctrl-C interrupts the terminal's whole process group, the temporary server too; Prefect's own crash
    handling would then retry reporting to the dead server for a minute or more before the command returned.
    Nothing is lost by leaving at once: every finished result is already in the store (writes are atomic).
    """
    print(f"\n{INTERRUPTED}", file=sys.stderr, flush=True)
    _kill_children()
    sys.stdout.flush()
    os._exit(130)  # 128 + SIGINT, as shells report an interrupted command


def _kill_children() -> None:
    """Terminate the worker processes and the temporary server, where they were started."""
    if "tasks.compute.workers" in sys.modules:
        sys.modules["tasks.compute.workers"].stop_workers()
    server_mod = sys.modules.get("prefect.server.api.server")
    for server in list(server_mod.SubprocessASGIServer._instances.values()) if server_mod else []:
        if server.server_process is not None and server.server_process.poll() is None:
            server.server_process.terminate()


class _OneLineFailures(logging.Filter):
    """Drop Prefect's console records that carry a traceback of a UserError or EnvironmentFailure.

    Those are reported by the command line as one line; Prefect would print the traceback of every task and
    flow they passed through. Other exceptions (bugs of ours) keep their tracebacks.
    """

    seen_one_line = False  # a flow logged its one-line failure (flows/failures.py): its "Finished" lines go too

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a record about one of our one-line failures."""
        from flows.failures import MARK

        exc = record.exc_info[1] if record.exc_info else None
        if getattr(record, MARK, False):
            _OneLineFailures.seen_one_line = True  # said by the command line's own `error:` line
            return False
        if isinstance(exc, (UserError, EnvironmentFailure)) or _oom_or_disk(exc) is not None:
            return False
        msg = record.getMessage()
        return not ("Finished in state Failed" in msg and (
            _OneLineFailures.seen_one_line or any(n in msg for n in ("UserError", "EnvironmentFailure"))))


def quiet_one_line_failures() -> None:
    """Install the filter on Prefect's console handlers (the UI's log keeps everything)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", ""):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler) and not any(
                    isinstance(f, _OneLineFailures) for f in handler.filters):
                handler.addFilter(_OneLineFailures())


def _oom_or_disk(exc: BaseException | None) -> str | None:
    """One line for an out-of-memory or disk failure, else None."""
    if isinstance(exc, MemoryError):
        return "out of memory; hint: close other programs, or lower finetune.batch_size / generate.batch_size"
    if isinstance(exc, OSError) and exc.errno in ENV_ERRNOS:
        where = f" at {exc.filename}" if exc.filename else ""
        return (f"{ENV_ERRNOS[exc.errno]}{where}; hint: free space or fix the permissions, then run the same "
                "command again (finished results are kept)")
    if isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc):  # torch's CPU allocator
        return "out of memory in torch; hint: lower finetune.batch_size / generate.batch_size, or use a GPU"
    return None


def _parser() -> argparse.ArgumentParser:
    """Command-line options (argparse itself prints --help and usage errors, in milliseconds)."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.search",
        description="Find the base model that fine-tunes best on your datasets: merge, LoRA fine-tune, judge "
                    "pairwise, rate with Bradley-Terry, validate on a held-out dataset.")
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="search config YAML (default: the demo)")
    parser.add_argument("--store", default=None, help="store folder or URL (default: $BASESEARCH_STORE or ./store)")
    parser.add_argument("--dry-run", action="store_true", help="print what the search would compute, what the store "
                        "already holds and what the rest costs, then stop (no model is loaded, nothing is computed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line: validate the config up front, run the flow, print the ranking and the report's path."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:  # Ctrl-C during the checks, or in a search on a server of the user's
        print(f"\n{INTERRUPTED}", file=sys.stderr)
        return 130
    except (UserError, EnvironmentFailure) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UserError) else 1
    except (OSError, MemoryError, RuntimeError) as e:
        line = _oom_or_disk(e)
        if line is None:
            raise  # a bug of ours: its traceback is what a report needs
        print(f"error: {line}", file=sys.stderr)
        return 1


def _dry_run(config: Any, store: str) -> int:
    """--dry-run: the checks, then the plan printed; a cap the plan exceeds is said, not enforced."""
    from tasks.plan.jobs import check_budget, plan_lines, search_plan
    from tasks.plan.prepare import prepare
    from tasks.store.store import Store

    prep = prepare(config)
    for warning in prep.warnings:
        say(f"warning: {warning}")
    plan = search_plan(config, prep, Store(store))
    print("\n".join(plan_lines(plan)))
    try:
        check_budget(plan, config)
    except UserError as e:
        print(f"a real run would refuse to start: {e}")
    return 0


def _run(args: argparse.Namespace) -> int:
    """main's body: check, start the server, run the flow, print the ranking and the report's path."""
    from tasks.config.schema import load_config
    from tasks.store.store import resolve_store

    store = resolve_store(args.store)
    config = load_config(args.config)
    say(f"search {config.name}: {len(config.candidates)} candidates, {len(config.merges)} merges, "
        f"{len(config.datasets)} datasets; store {store}")
    if args.dry_run:
        return _dry_run(config, store)
    servers: list[TemporaryServer] = []

    def start_server() -> None:
        """Check the store (a file, not writable: one line), then start Prefect's temporary server while the slower
        checks and the imports go on (none when PREFECT_API_URL names a server)."""
        from prefect.settings import PREFECT_API_URL

        from tasks.store.store import Store

        Store(store)
        prefect_home()

        if PREFECT_API_URL.value():
            from tasks.plan.pool import check_server

            check_server()  # a server that is gone: one line now, not Prefect's traceback minutes later
        else:
            say("starting Prefect's temporary server in the background (set PREFECT_API_URL to use a running one)")
            servers.append(TemporaryServer())
            signal.signal(signal.SIGINT, exit_on_interrupt)  # a real server outlives Ctrl-C; this one does not

    try:
        from tasks.plan.prepare import prepare

        # fail fast, before any model loads: datasets and candidate folders first (in a fraction of a second),
        # then merge recipes and API models
        prep = prepare(config, cheap_checks_passed=start_server)  # its warnings are logged by the flow
        from tasks.plan.jobs import check_budget, plan_lines, search_plan
        from tasks.store.store import Store

        plan = search_plan(config, prep, Store(store))
        for line in plan_lines(plan):
            say(line)
        check_budget(plan, config)  # a plan over a cap stops here, before the flow starts
        from flows.search import search, summary_lines  # the heavy imports (torch, transformers), beside the server
        from tasks.plan.prepare import hand_over

        hand_over(config, prep)  # the flow below starts from this check instead of repeating it

        for server in servers:
            server.wait()
            say(f"Prefect's temporary server is up ({time.monotonic() - server.started:.0f} s)")
    except BaseException:
        for server in servers:
            server.stop()  # started for nothing: gone before the error line is read
        raise
    quiet_one_line_failures()
    result = search(config, store)
    stop_temporary_server()
    print()
    for line in summary_lines(result):
        print(line)
    return 0

