"""Pool mode: the GPU stages as runs of their deployments (flows/stages.py) on a Prefect work pool.

Every call whose result is not in the store yet is submitted at once and waited for through the API: a merge as a run
of its own, a batch of fine-tunes or generations as `compute.pool_runs` runs that each get the whole batch and take
its jobs in turn (flows/stages.py), so that a worker's process, which imports torch, transformers and Prefect before
its first job (~8 s on a CPU core, measured by bench/pool_overhead.py), starts once for several jobs. By default
(`compute.pool_stay_s`) those runs are not sent one by one: a search starts a few runs of the `stages` flow that stay,
and queues each run's parameters in the store for them (tasks/plan/queue.py, `Session` below), so a worker process
starts a few times a search, not once a batch. A job gets
exactly the arguments the local call would (tasks/plan/execute.py): identical code, identical results. The
store must be reachable from the workers, since results travel through it, not through Prefect: one folder mounted at
the same path everywhere, or a bucket (s3://...), whose workers share no disk (tasks/store/portable.py). The preflight
(check_pool) runs before any model is loaded.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable
from uuid import UUID

from tasks.core.errors import UserError
from tasks.plan.queue import close_queue, done, open_queue, put
from tasks.store.guards import say
from tasks.store.keys import content_key
from tasks.store.portable import portable
from tasks.store.store import Store

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun

    from tasks.config.schema import ComputeConfig

STAGE_FLOWS = ("merge", "finetune", "generate")  # flow names in flows/stages.py, deployed by deployments/prefect.yaml
STAYING = "stages"  # the flow whose runs stay for the whole search (compute.pool_stay_s), in flows/stages.py too
BATCHED = ("finetune", "generate")  # the flows that take a batch of jobs (a merge is a run, or an entry, alone)
DEPLOY_HINT = "apply the deployments: python deployments/apply.py"
API_TIMEOUT_S = 10.0  # one API call; a server that takes longer is treated as unreachable
POLL_S = float(os.environ.get("BASESEARCH_POLL_SECONDS", "2"))  # how often waiting runs are polled
# How long runs may wait in the queue while the pool has no worker online before the search gives up;
# a worker that restarts within this time loses nothing.
NO_WORKER_GRACE_S = float(os.environ.get("BASESEARCH_NO_WORKER_GRACE_SECONDS", "120"))
PROGRESS_S = 5.0  # how often at most a batch's stored results are counted for its progress artifact
# How often staying runs look at the queue and the search at what they did: one listing of the bucket each, so
# a job waits 0.5 s at most to be taken (a batch-ending run's process start costs 8-20 s).
QUEUE_POLL_S = float(os.environ.get("BASESEARCH_QUEUE_POLL_SECONDS", "0.5"))
REPLACED_CRASHES = 2  # staying runs a search replaces when they crash; one more is the worker's problem to show
END_WAIT_S = 30.0  # how long an ending search waits for its staying runs to end (each ends at its next look)


@dataclass(frozen=True)
class Batch:
    """A batch of GPU-stage jobs done: each job's (store path, reused?) in order, and the device time they took."""

    results: list[tuple[str, bool]]
    # Pool mode: the stage runs' summed seconds in the Running state on their workers, so the time a run waited in
    # the queue or for its machine to start is not counted as GPU time. Local mode: None, since this machine's
    # device is held for the stage's whole wall time, which the caller measures.
    device_s: float | None = None


@dataclass(frozen=True)
class StageCall:
    """One stage run to send to the pool: its flow, parameters, readable name, and result in the store."""

    flow: str
    name: str
    parameters: dict[str, Any]
    result_rel: str
    key: str


def _label(stage: str, datasets: list[str]) -> str:
    """`finetune on extraction, classification`: what a batch of jobs does, for its progress artifact."""
    return f"{stage} on {', '.join(dict.fromkeys(datasets))}" if datasets else stage


_RUN_ARTIFACT: dict[str, Any] = {}  # flow run id -> its one progress artifact, reused by every batch of the run


class Progress:
    """The flow run's progress artifact, following one batch of stage jobs (shown on the run's page in the UI).

    One artifact per flow run, not one per batch: eight of them would bury the report and the ranking.
    """

    def __init__(self, label: str, total: int) -> None:
        """Point the run's artifact at this batch, at 0% (only inside a flow run, and only for batches worth
        watching); create it for the run's first batch."""
        self.label, self.total, self.finished, self.id = label, total, 0, None
        if total < 2:
            return
        from prefect.artifacts import create_progress_artifact, update_progress_artifact
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        if ctx is None or ctx.flow_run is None:
            return
        run, description = str(ctx.flow_run.id), f"{label}: 0/{total} done"
        try:
            if run in _RUN_ARTIFACT:
                update_progress_artifact(_RUN_ARTIFACT[run], 0.0, description=description)
            else:
                _RUN_ARTIFACT[run] = create_progress_artifact(0.0, key="progress", description=description)
            self.id = _RUN_ARTIFACT[run]
        except Exception:  # noqa: BLE001 - progress is a nicety; never fail a stage for it
            self.id = None

    def done(self, n: int) -> None:
        """Count `n` more finished jobs."""
        self.finished += n
        if self.id is None or n == 0:
            return
        from prefect.artifacts import update_progress_artifact

        try:
            update_progress_artifact(self.id, 100.0 * self.finished / self.total,
                                     description=f"{self.label}: {self.finished}/{self.total} done")
        except Exception:  # noqa: BLE001 - see above
            pass


def state_line(state: Any) -> str:
    """A run's final state for an error line: its name and the start of its message."""
    return f"{state.name}: {(state.message or '').strip()[:200]}"


def _client() -> SyncPrefectClient:
    """A synchronous Prefect client whose calls give up after API_TIMEOUT_S."""
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True, httpx_settings={"timeout": API_TIMEOUT_S})


def api_url() -> str | None:
    """The Prefect server this process talks to (None: Prefect would start a temporary one)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def check_server() -> str:
    """The API URL, after two quick calls (health, then an authenticated one); UserError when it is not usable."""
    import base64

    import httpx
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY

    url = api_url()
    if not url:
        raise UserError("compute.mode pool needs a Prefect server, and PREFECT_API_URL is not set; "
                        "hint: prefect server start, then prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api")
    auth, key = PREFECT_API_AUTH_STRING.value(), PREFECT_API_KEY.value()
    headers = ({"Authorization": f"Basic {base64.b64encode(auth.encode()).decode()}"} if auth
               else {"Authorization": f"Bearer {key}"} if key else {})
    try:
        # Bare httpx calls: the Prefect client retries connection errors for minutes, these answer in seconds.
        health = httpx.get(f"{url.rstrip('/')}/health", timeout=5.0, headers=headers)
        version = httpx.get(f"{url.rstrip('/')}/admin/version", timeout=5.0, headers=headers)
    except httpx.HTTPError as e:
        raise UserError(f"cannot reach the Prefect server at {url} ({type(e).__name__}); hint: start it (prefect "
                        "server start), or unset PREFECT_API_URL (prefect config unset PREFECT_API_URL) and a local "
                        "search starts a temporary server of its own") from None
    if health.status_code != 200:
        raise UserError(f"the Prefect server at {url} answered {health.status_code} to a health check; "
                        "hint: check PREFECT_API_URL (it ends in /api)")
    if version.status_code in (401, 403):
        raise UserError(f"the Prefect server at {url} refused this client ({version.status_code}); "
                        "hint: set PREFECT_API_AUTH_STRING to the server's user:password")
    return url


def stage_deployment(client: SyncPrefectClient, flow: str, pool: str) -> UUID:
    """The id of the deployment of stage flow `flow` on work pool `pool`; UserError when there is none."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, WorkPoolFilter, WorkPoolFilterName

    found = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
                                    work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])), limit=1)
    if not found:
        raise UserError(f"no deployment of the '{flow}' stage flow on work pool '{pool}' (compute.pool); hint: "
                        f"{DEPLOY_HINT}, with the stage deployments' work pool set to '{pool}'")
    return found[0].id


def workers_online(client: SyncPrefectClient, pool: str) -> int:
    """How many workers of `pool` have sent a heartbeat recently."""
    from prefect.client.schemas.objects import WorkerStatus

    return sum(w.status == WorkerStatus.ONLINE for w in client.read_workers_for_work_pool(pool))


def check_pool(compute: ComputeConfig, merges: bool = True) -> None:
    """Check, in seconds, that pool mode can run: server up, pool there with a worker, stage deployments there."""
    if not compute.pool:
        raise UserError("compute.pool: name the work pool (e.g. pool: gpu) when compute.mode is pool")
    url = check_server()
    from prefect.exceptions import ObjectNotFound

    with _client() as client:
        try:
            client.read_work_pool(compute.pool)
        except ObjectNotFound:
            raise UserError(f"work pool '{compute.pool}' (compute.pool) does not exist on {url}; "
                            f"hint: {DEPLOY_HINT} (it creates the pools), then "
                            f"prefect worker start --pool {compute.pool}") from None
        # Staying runs call the stage flows as subflows of their own: only their deployment is needed.
        for flow in (STAYING,) if compute.pool_stay_s > 0 else STAGE_FLOWS if merges else STAGE_FLOWS[1:]:
            stage_deployment(client, flow, compute.pool)
        if not workers_online(client, compute.pool):
            raise UserError(f"work pool '{compute.pool}' has no worker online, so no stage would ever start; "
                            f"hint: prefect worker start --pool {compute.pool}")


def run_in_pool(calls: list[StageCall], compute: ComputeConfig, store: str) -> Batch:
    """(store path, reused?) for every call, and the runs' device time: results already in the store are reused, the
    rest run in the pool (a batch of fine-tunes or generations as a few runs that take its jobs in turn)."""
    st = Store(store)
    todo = [c for c, there in zip(calls, _stored(st, calls)) if not there]
    run_s: dict[str, float] = {}
    if todo:
        assert compute.pool, "check_pool ran first"
        progress = Progress(_label(todo[0].flow, [c.parameters.get("dataset", "") for c in todo if "dataset" in c.parameters]),
                            len(todo))
        with _client() as client:
            # Sent per batch, a merge is a run of its own; staying runs take merges as any other entry, so a
            # round's merges need no more of them than a batch would.
            n = runs_for(client, compute, len(todo)) if todo[0].flow in BATCHED or compute.pool_stay_s > 0 \
                else len(todo)
            stored = lambda: sum(_stored(st, todo))  # noqa: E731
            if compute.pool_stay_s > 0:
                run_s = in_session(client, session_for(compute, st), pool_runs(todo, n, st), n, progress, stored)
            else:
                runs = {r.name: _submit(client, r, compute.pool) for r in pool_runs(todo, n, st)}
                run_s = _wait(client, runs, compute.pool, progress, stored)
        failed = [c.name for c, there in zip(todo, _stored(st, todo)) if not there]
        if failed:
            raise RuntimeError(f"{', '.join(failed)}: the stage run completed but its result is not in the store "
                               f"{st.root}; the workers must share the store (same folder at the same path, or a URL)")
    return Batch([(c.result_rel, c not in todo) for c in calls], sum(run_s.values()))


def _stored(st: Store, calls: list[StageCall]) -> list[bool]:
    """Whether each call's result is in the store (on a bucket, several asked at once)."""
    return st.each(lambda c: st.exists(c.result_rel), calls)


def runs_for(client: SyncPrefectClient, compute: ComputeConfig, jobs: int) -> int:
    """How many runs a batch of `jobs` goes as: compute.pool_runs, or the pool's concurrency limit, else its workers
    online (each run then keeps one worker slot busy), at most one per job."""
    if compute.pool_runs != "auto":
        return min(compute.pool_runs, jobs)
    assert compute.pool
    limit = client.read_work_pool(compute.pool).concurrency_limit
    return max(1, min(limit or workers_online(client, compute.pool), jobs))


@dataclass(frozen=True)
class PoolRun:
    """One flow run to create: its flow, readable name, parameters, and the key a re-sent search finds it by."""

    flow: str
    name: str
    parameters: dict[str, Any]
    idempotency_key: str


def pool_runs(calls: list[StageCall], n: int, store: Store) -> list[PoolRun]:
    """The runs for `calls`: a merge each; a batch of fine-tunes or generations as `n` runs, each given every job and
    starting at its own share of them (flows/stages.py). With a remote store, local paths travel as `store:<rel>`
    (tasks/store/portable.py): the worker needs no disk in common."""
    flow = calls[0].flow
    if flow not in BATCHED:
        return [PoolRun(flow, c.name, portable(c.parameters, store), f"{flow}-{c.key}") for c in calls]
    jobs = [portable(c.parameters, store) for c in calls]
    batch = content_key(sorted(c.key for c in calls))
    datasets = ",".join(dict.fromkeys(str(c.parameters.get("dataset", "")) for c in calls))
    name = lambda i: calls[0].name if len(calls) == 1 else f"{flow}-{datasets}" + (f"-{i + 1}of{n}" if n > 1 else "")  # noqa: E731
    return [PoolRun(flow, name(i), {"jobs": jobs, "store_root": store.url, "first": i * len(calls) // n},
                    f"{flow}-{batch}-{i}of{n}") for i in range(n)]


def _submit(client: SyncPrefectClient, run: PoolRun, pool: str) -> FlowRun:
    """Create the stage run, or find the one a killed search already created for the same results."""
    from prefect.deployments import run_deployment

    deployment = stage_deployment(client, run.flow, pool)
    # The idempotency key comes from the results' content keys: a search started again after a crash waits on the
    # runs it had already sent instead of sending duplicates. A run that failed is sent again under a new key.
    made = run_deployment(deployment, parameters=run.parameters, flow_run_name=run.name, timeout=0,
                          idempotency_key=run.idempotency_key)
    if made.state and made.state.is_final() and not made.state.is_completed():
        made = run_deployment(deployment, parameters=run.parameters, flow_run_name=run.name, timeout=0,
                              idempotency_key=f"{run.idempotency_key}-{time.time_ns()}")
    return made


def _wait(client: SyncPrefectClient, runs: dict[str, FlowRun], pool: str, progress: Progress,
          stored: Callable[[], int]) -> dict[str, float]:
    """Poll the runs (by name) until all are final: each completed run's seconds in the Running state (Prefect's
    total_run_time, queueing excluded); raise on a failed run or when the pool has had no worker too long. `stored`
    counts the batch's results in the store, for the progress artifact (asked every PROGRESS_S at most)."""
    pending = dict(runs)
    run_s: dict[str, float] = {}
    failures: list[str] = []
    unattended_since: float | None = None
    counted = 0.0
    while pending:
        time.sleep(POLL_S)
        read = {name: client.read_flow_run(run.id) for name, run in pending.items()}
        states = {name: run.state for name, run in read.items()}
        finished = [name for name, state in states.items() if state is not None and state.is_final()]
        for name in finished:
            del pending[name]
            took = getattr(read[name], "total_run_time", None)
            run_s[name] = took.total_seconds() if took is not None else 0.0
            if not states[name].is_completed():
                failures.append(f"{name} ({state_line(states[name])})")
        if progress.id is not None and (finished or time.monotonic() - counted > PROGRESS_S):
            counted = time.monotonic()
            progress.done(max(0, stored() - progress.finished))
        queued = [k for k in pending if states[k] is not None and (states[k].is_scheduled() or states[k].is_pending())]
        unattended_since = _unattended(client, pool, len(queued), unattended_since)
    if failures:
        raise RuntimeError(f"stage run(s) failed on pool '{pool}': {'; '.join(failures)}")
    return run_s


def _unattended(client: SyncPrefectClient, pool: str, queued: int, since: float | None) -> float | None:
    """Since when `queued` runs have waited on a pool with no worker online (None: they do not); UserError once that
    is longer than NO_WORKER_GRACE_S. Only runs still waiting for a worker count: a running one has its worker."""
    if not queued or workers_online(client, pool):
        return None
    since = since or time.monotonic()
    if time.monotonic() - since > NO_WORKER_GRACE_S:
        raise UserError(f"work pool '{pool}' has had no worker online for {NO_WORKER_GRACE_S:.0f} s while "
                        f"{queued} stage run(s) wait; hint: prefect worker start --pool {pool}")
    return since


@dataclass
class Session:
    """A search's staying runs (compute.pool_stay_s): its queue in the store (tasks/plan/queue.py), the runs serving it
    by name, those known to have ended, and the next entry's number."""

    id: str
    store: Store
    pool: str
    label: str
    stay_s: float
    owner: str
    runs: dict[str, FlowRun] = field(default_factory=dict)
    ended: set[str] = field(default_factory=set)
    seq: int = 0
    crashes: int = 0  # runs that crashed and were replaced

    def alive(self) -> list[str]:
        """The runs not known to have ended."""
        return [name for name in self.runs if name not in self.ended]


_SESSIONS: dict[tuple[str, str], Session] = {}  # (store, owner: the search's flow run) -> its session


def _owner() -> tuple[str, str]:
    """Who sends: the current flow run's id and name, else this process."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow_run is not None:
        return str(ctx.flow_run.id), ctx.flow_run.name
    return f"pid-{os.getpid()}", "search"


def session_for(compute: ComputeConfig, st: Store) -> Session:
    """The current search's session on store `st`, opened on its first batch."""
    owner, label = _owner()
    if (st.url, owner) not in _SESSIONS:
        assert compute.pool
        sid = content_key(owner, time.time_ns())[:16]
        open_queue(st, sid, f"{label} {owner}")
        _SESSIONS[(st.url, owner)] = Session(sid, st, compute.pool, label, compute.pool_stay_s, owner)
    return _SESSIONS[(st.url, owner)]


def _staff(client: SyncPrefectClient, s: Session, n: int) -> None:
    """Start staying runs until `n` are alive (never fewer than one)."""
    for _ in range(max(1, n) - len(s.alive())):
        i = len(s.runs) + 1
        name = f"stages-{s.label}-{i}"
        params = {"store_root": s.store.url, "session": s.id, "stay_s": s.stay_s, "poll_s": QUEUE_POLL_S}
        s.runs[name] = _submit(client, PoolRun(STAYING, name, params, f"{STAYING}-{s.id}-{i}"), s.pool)


def in_session(client: SyncPrefectClient, s: Session, runs: list[PoolRun], n: int, progress: Progress,
               stored: Callable[[], int]) -> dict[str, float]:
    """Queue `runs` for the session's staying runs (started or topped up to `n`) and wait until each is done: every
    queued run's seconds in the Running state, as the server recorded its subflow; raise as _wait does."""
    entries = {}
    for r in runs:
        s.seq += 1
        entries[put(s.store, s.id, s.seq, r.flow, r.name, r.parameters)] = r.name
    _staff(client, s, n)
    waiting, records = set(entries), {}
    unattended_since: float | None = None
    looked = counted = time.monotonic()
    while waiting:
        time.sleep(QUEUE_POLL_S)
        finished = done(s.store, s.id, sorted(waiting))
        records |= finished
        waiting -= set(finished)
        if progress.id is not None and (finished or time.monotonic() - counted > PROGRESS_S):
            counted = time.monotonic()
            progress.done(max(0, stored() - progress.finished))
        if not waiting or time.monotonic() - looked < POLL_S:
            continue
        looked = time.monotonic()
        queued = _look(client, s)
        if len(s.alive()) < n:  # one ended for want of work just as this batch came, or crashed: start another
            _staff(client, s, n)
        unattended_since = _unattended(client, s.pool, queued, unattended_since)
    failures = [f"{entries[e]} ({r['error']})" for e, r in records.items() if r["error"]]
    if failures:
        raise RuntimeError(f"stage run(s) failed on pool '{s.pool}': {'; '.join(failures)}")
    return {entries[e]: _seconds(client, r["flow_run_id"]) for e, r in records.items()}


def _look(client: SyncPrefectClient, s: Session) -> int:
    """Read the alive runs' states: note those that ended; raise on one that failed (its flow raised), or that crashed
    (its process or machine died: kill -9, a lost spot machine) once more than REPLACED_CRASHES allow. How many still
    wait for a worker."""
    queued = 0
    for name in s.alive():
        state = client.read_flow_run(s.runs[name].id).state
        if state is None:
            continue
        if state.is_final():
            s.ended.add(name)
            why = f"{name} ({state_line(state)})"
            if state.is_crashed() and s.crashes < REPLACED_CRASHES:
                # Its entry's lock died with it (its lease ends after BASESEARCH_LEASE_SECONDS): the run that
                # replaces it takes the entry over, and a fine-tune goes on from its last checkpoint.
                s.crashes += 1
                say(logging.WARNING, f"pool: stage run {why} ended; another takes over its work")
            elif not state.is_completed():
                raise RuntimeError(f"stage run(s) failed on pool '{s.pool}': {why}")
        queued += state.is_scheduled() or state.is_pending()
    return queued


def _seconds(client: SyncPrefectClient, flow_run_id: str) -> float:
    """A flow run's seconds in the Running state (Prefect's total_run_time)."""
    took = getattr(client.read_flow_run(UUID(flow_run_id)), "total_run_time", None)
    return took.total_seconds() if took is not None else 0.0


def end_sessions() -> None:
    """End the current search's sessions: their queues go, so their runs end at their next look (waited for up to
    END_WAIT_S, so the search's page shows them finished); a run no worker started yet is cancelled."""
    from prefect.states import Cancelled

    owner, _ = _owner()
    for key in [k for k, s in _SESSIONS.items() if s.owner == owner]:
        s = _SESSIONS.pop(key)
        close_queue(s.store, s.id)
        deadline = time.monotonic() + END_WAIT_S
        try:
            with _client() as client:
                while s.alive() and time.monotonic() < deadline:
                    for name in s.alive():
                        state = client.read_flow_run(s.runs[name].id).state
                        if state is not None and (state.is_scheduled() or state.is_pending()):
                            client.set_flow_run_state(s.runs[name].id, Cancelled(message="its search ended"),
                                                      force=True)
                        elif state is not None and state.is_final():
                            s.ended.add(name)
                    time.sleep(QUEUE_POLL_S)
        except Exception:  # noqa: BLE001 - the runs end by themselves after stay_s; the search's result stands
            pass
