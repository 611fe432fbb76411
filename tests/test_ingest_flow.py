"""The Prefect flow `ingest` (what the deployment ingest/ui runs) on a real Prefect server, Prefect's temporary one
for in-process flow runs: a Completed run whose result is the manifest and whose `ingest` artifact is the report;
a stored-completions source whose API key reaches neither the run's parameters nor its logs; a user's mistake a
Failed run with the command line's one line."""

from __future__ import annotations

import json

import pytest
import yaml

from flows.ingest import ingest
from tasks.ingest.config import IngestConfig
from tasks.ingest.stored import STORED
from tests.conftest import wait_for
from tests.fake_openai import FakeOpenAI
from tests.ingest_traffic import write_traffic
from tests.prefect_server import ROOT

pytestmark = pytest.mark.filterwarnings("ignore")
KEY = "sk-flow-test-5555555555555555"
ENV = "BASESEARCH_TEST_FLOW_KEY"


def run_of(state):
    """The flow run a state belongs to, its logs' text, and its artifacts, read back from the server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        text = lambda: "\n".join(log.message for log in client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))))
        # the run's log lines reach the server in batches, after its final state: wait for its last one
        wait_for(lambda: "Finished in state" in text(), 60, lambda: f"the run's last log line:\n{text()}", poll_s=0.5)
        logs = text()
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return run, logs, artifacts


def test_the_ingest_flow_run_completes_with_the_manifest_and_the_report(tmp_path):
    write_traffic(tmp_path / "log.jsonl", 400, seed=7, broken_at=-1)
    cfg = IngestConfig(source=str(tmp_path / "log.jsonl"), out=str(tmp_path / "out"), group_by="metadata.thread_id")
    state = ingest(cfg, return_state=True)
    assert state.is_completed(), state
    manifest = state.result()
    assert manifest == json.loads((tmp_path / "out" / "ingest.json").read_text())
    assert manifest["counts"]["lines"] == 400 and manifest["counts"]["rows"] > 100
    run, _, artifacts = run_of(state)
    assert run.name == f"ingest-{cfg.source}" and run.state.is_completed()
    assert run.parameters["config"]["group_by"] == "metadata.thread_id"
    report = [a for a in artifacts if a.key == "ingest"]
    assert len(report) == 1 and report[0].data == (tmp_path / "out" / "ingest.md").read_text()


def test_a_stored_completions_run_keeps_the_key_out_of_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    with FakeOpenAI(api_key=KEY) as srv:
        for i in range(12):
            srv.stored.add({"id": f"chatcmpl-{i}", "object": "chat.completion", "created": 1_740_000_000 + i,
                            "model": "gpt-4o-2024-08-06", "metadata": {"app": "faq"},
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": f"Answer {i}."}}]},
                           [{"role": "user", "content": f"Question number {i} about the opening hours?"}])
        state = ingest(IngestConfig(source=STORED, out=str(tmp_path / "out"), base_url=srv.base_url,
                                    api_key_env=ENV, page_size=5), return_state=True)
    assert state.is_completed(), state
    assert state.result()["counts"]["rows"] == 12 and state.result()["source"]["api"]["list_pages"] == 3
    run, logs, _ = run_of(state)
    assert KEY not in json.dumps(run.parameters) + logs and run.parameters["config"]["api_key_env"] == ENV


def test_a_users_mistake_fails_the_run_in_its_one_line(tmp_path):
    state = ingest(IngestConfig(source=str(tmp_path / "nothing.jsonl"), out=str(tmp_path / "out")),
                   return_state=True)
    assert state.is_failed() and state.message == f"{tmp_path / 'nothing.jsonl'}: no such file or folder"
    _, logs, _ = run_of(state)
    assert f"error: {state.message}" in logs and "Traceback" not in logs


def test_the_ui_deployment_runs_this_flow_with_a_form_it_accepts():
    listed = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())["deployments"]
    ui = next(d for d in listed if d["entrypoint"] == "flows/ingest.py:ingest")
    assert ui["name"] == "ui" and IngestConfig(**ui["parameters"]["config"]).group_by == "metadata.thread_id"
