"""A search's stage jobs as files in the store, for stage runs that stay for the whole search (`compute.pool_stay_s`).

A pool stage run is a new process on its worker: it imports torch, transformers, peft and Prefect before its first
job (8 s on an idle CPU core, 15-20 s on a busy one; bench/pool_overhead.py), and a search sends ~60 batches one after
another. So in pool mode a few runs of the `stages` deployment (flows/stages.py) start with the search's first batch
and take every later batch from here, the store being the one thing search and workers share:

    .queue/<session>/open                  written when the search starts sending; removed when it ends
    .queue/<session>/jobs/<seq>-<flow>.json  one stage run's worth of work: the flow, its run name and parameters
    .queue/<session>/done/<seq>-<flow>.json  written by the run that did it: its flow run id, and an error or null

A run takes the oldest entry no one holds, under the entry's lock (or, across machines, its lease: a run that dies
loses it and another run takes the entry over), runs it as a subflow, marks it done, and looks again. It ends when
the search removes its queue, or after `stay_s` seconds with nothing to take. This module knows the files only; the
Prefect side is in tasks/plan/pool.py (the search) and flows/stages.py (the runs).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from tasks.store.store import Store

QUEUES = ".queue"


def queue_rel(session: str) -> str:
    """The session's folder in the store."""
    return f"{QUEUES}/{session}"


def open_queue(st: Store, session: str, owner: str) -> None:
    """Start a session: runs serve it while its `open` file is there."""
    st.write_text(f"{queue_rel(session)}/open", owner)


def is_open(st: Store, session: str) -> bool:
    """Whether the search that owns the session still sends work."""
    return st.exists(f"{queue_rel(session)}/open")


def close_queue(st: Store, session: str) -> None:
    """End a session: its runs stop at their next look; its entries go (their results stay in the store)."""
    path = st.path(queue_rel(session))
    try:
        st.fs.rm(path, recursive=True)
    except FileNotFoundError:  # already gone (ended twice, or never sent anything)
        pass


def put(st: Store, session: str, seq: int, flow: str, name: str, parameters: dict[str, Any]) -> str:
    """Queue one stage run's work; its entry name (sorted by `seq`: the oldest is taken first)."""
    entry = f"{seq:05d}-{flow}.json"
    st.write_json(f"{queue_rel(session)}/jobs/{entry}", {"flow": flow, "name": name, "parameters": parameters})
    return entry


def look(st: Store, session: str) -> tuple[bool, list[str]]:
    """(whether the session is open, its entries not done yet, oldest first): one listing of its folder, so a run
    that looks every half second costs the bucket one request a look, not three."""
    q = st.path(queue_rel(session))
    names = {p.removeprefix(f"{q}/") for p in st.tree(queue_rel(session))}
    entries = lambda sub: {n.split("/", 1)[1] for n in names if n.startswith(f"{sub}/")}  # noqa: E731
    return "open" in names, sorted(entries("jobs") - entries("done"))


def done(st: Store, session: str, entries: list[str]) -> dict[str, dict[str, Any]]:
    """Of `entries`, those done: each one's record (flow run id, error)."""
    q = queue_rel(session)
    return {e: st.read_json(f"{q}/done/{e}") for e in sorted(st.names(f"{q}/done") & set(entries))}


def serve(st: Store, session: str, stay_s: float, poll_s: float,
          run_entry: Callable[[dict[str, Any]], tuple[str, str | None]]) -> int:
    """Take the session's entries one at a time until it closes or `stay_s` seconds pass with none to take; each
    through `run_entry` (which returns the flow run id and an error or None). How many this run did."""
    q, ran, idle_since = queue_rel(session), 0, time.monotonic()
    while True:
        open_, todo = look(st, session)
        if not open_:
            break
        took = False
        for entry in todo:
            with st.lock(f"{q}/jobs/{entry}", wait=False) as mine:
                if not mine or entry not in look(st, session)[1]:
                    continue  # another run holds it, or did it while this one listed
                run_id, error = run_entry(st.read_json(f"{q}/jobs/{entry}"))
                if is_open(st, session):  # a search that ended (or failed) meanwhile reads no more records
                    st.write_json(f"{q}/done/{entry}", {"flow_run_id": run_id, "error": error})
                ran, took = ran + 1, True
                break  # look again from the oldest: a newer batch may have come, or a held entry been given up
        if took:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > stay_s:
            break
        else:
            time.sleep(poll_s)
    return ran
