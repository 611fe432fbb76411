"""Quiet, offline-friendly environment defaults, set before Prefect and HF load: imported first by the flows and
by every worker process."""

import os

# Telemetry off: nothing outside is reachable here, and a search should not phone home anyway.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Prefect gives its temporary server 20 s to start; on a busy 2-core laptop it was measured at 22-34 s (load 4-15),
# so unless the user set their own, it gets 10 minutes: a start that slow is still a start. (Set here, before
# Prefect reads its settings; an environment variable of the user's wins, as setdefault keeps it.)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Progress is logged per stage; transformers' own per-file bars would bury it.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# After Ctrl-C the CLI leaves at once (flows.cli); multiprocessing's resource tracker, a
# process of its own that reads this at its start, would then warn about the worker pool's semaphores it frees.
os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning:multiprocessing.resource_tracker")

import warnings  # noqa: E402

# peft calls a transformers method that transformers 5 deprecates; the warning is theirs to fix, not the user's.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

import logging  # noqa: E402


class _NoCompletedTaskLines(logging.Filter):
    """Drops Prefect's `Finished in state Completed()` line of every task run: a demo logged 155 of them among ~400
    lines; each stage logs its own line with counts and seconds. A task that fails or crashes is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a task run's completion line."""
        return not str(record.msg).startswith("Finished in state Completed(")


# On the logger, not a handler: the console and the flow run's log in the UI both lose the line.
logging.getLogger("prefect.task_runs").addFilter(_NoCompletedTaskLines())
