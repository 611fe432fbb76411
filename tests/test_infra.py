"""What can be checked here of infra/ and deployments/: the Kubernetes GPU job template (JSON, variables,
rendering), the compose file's structure, the Dockerfile, and prefect.yaml against the flows it names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "infra" / "k8s-gpu-job-template.json"
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"


def template() -> dict:
    """The Kubernetes base job template."""
    return json.loads(TEMPLATE.read_text())


def render(tmpl: dict, **values) -> dict:
    """The job configuration with the variables' defaults, overridden by `values` (as a Prefect worker does)."""
    from prefect.utilities.templating import apply_values

    props = tmpl["variables"]["properties"]
    defaults = {k: v["default"] for k, v in props.items() if "default" in v}
    return apply_values(tmpl["job_configuration"], defaults | values)


def test_k8s_template_is_a_valid_base_job_template():
    import jsonschema
    from prefect.server.schemas.actions import validate_base_job_template

    tmpl = template()
    validate_base_job_template(tmpl)  # Prefect's own check: every placeholder is a declared variable
    jsonschema.Draft7Validator.check_schema(tmpl["variables"])
    props = tmpl["variables"]["properties"]
    for name, spec in props.items():
        assert spec.get("description"), f"variable {name} has no description"
        if "default" in spec:
            jsonschema.validate(spec["default"], {**spec, "definitions": tmpl["variables"].get("definitions", {})})
    # The job configuration keys a Kubernetes worker reads.
    assert {"command", "env", "labels", "name", "namespace", "job_manifest"} <= set(tmpl["job_configuration"])
    assert {"gpu_count", "node_selector", "tolerations", "image", "store_claim"} <= set(props)


def test_k8s_template_asks_for_gpus_where_told():
    job = render(template())["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "prefect-job" and pod["restartPolicy"] == "Never"  # what the worker requires
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {"name": "store", "mountPath": "/store"} in container["volumeMounts"]

    job = render(template(), gpu_count=2, node_selector={"pool": "h100"},
                 tolerations=[{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}])
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"pool": "h100"} and pod["tolerations"][0]["value"] == "ml"
    # Every placeholder is filled: nothing like "{{ x }}" reaches Kubernetes.
    assert "{{" not in json.dumps(job["job_manifest"])


def test_compose_file_structure():
    spec = yaml.safe_load((ROOT / "infra" / "compose.yaml").read_text())
    services = spec["services"]
    assert {"postgres", "server", "cpu-worker", "gpu-worker", "deploy"} <= set(services)
    pools = {p["name"] for p in yaml.safe_load(PREFECT_YAML.read_text())["definitions"]["work_pools"].values()}
    for name in ("cpu-worker", "gpu-worker", "deploy"):
        svc = services[name]
        env = svc["environment"]
        assert env["PREFECT_API_URL"] == "http://server:4200/api"
        assert env["PREFECT_API_AUTH_STRING"].startswith("${PREFECT_AUTH")
        assert env["BASESEARCH_STORE"] == "/store" and "store:/store" in svc["volumes"]
        assert svc["depends_on"]["server"]["condition"] == "service_healthy"
        assert svc["build"]["dockerfile"] == "infra/Dockerfile"
        assert "db" not in svc["networks"]  # workers never reach the database
    for name, pool in (("cpu-worker", "cpu"), ("gpu-worker", "gpu")):
        assert re.search(rf"prefect worker start --pool {pool}\b", services[name]["command"]) and pool in pools
    gpu = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    server = services["server"]
    assert server["environment"]["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_AUTH")
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert all(p.startswith("127.0.0.1:") for p in server["ports"])
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in server and "healthcheck" in services["postgres"]
    assert spec["networks"]["db"]["internal"] is True and services["postgres"]["networks"] == ["db"]
    assert "--" not in services["postgres"]["environment"]["POSTGRES_PASSWORD"] and ":?" in \
        services["postgres"]["environment"]["POSTGRES_PASSWORD"]  # required, no default password


def test_dockerfile():
    text = (ROOT / "infra" / "Dockerfile").read_text()
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:[\d.]+-(cudnn-)?runtime-", text)
    pin = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
               if d.startswith("torch"))
    assert f"ARG TORCH_VERSION={pin.split('==')[1]}" in text
    for folder in ("flows", "tasks", "configs", "deployments"):
        assert f"COPY {folder} ./{folder}" in text
    assert "WORKDIR /opt/basesearch" in text and "USER basesearch" in text
    assert '"prefect", "worker", "start", "--pool", "gpu"' in text


@pytest.fixture(scope="module")
def deployments() -> list[dict]:
    """The deployments of deployments/prefect.yaml."""
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


def test_prefect_yaml_names_real_flows_with_valid_parameters(deployments):
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load(PREFECT_YAML.read_text())
    gpu_pool = spec["definitions"]["work_pools"]["gpu"]["name"]
    seen = {}
    for d in deployments:
        flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
        seen[f"{flow.name}/{d['name']}"] = d
        if d.get("parameters"):
            flow.validate_parameters(d["parameters"])  # the UI's defaults are accepted by the flow
        for s in d.get("schedules") or []:
            CronSchedule(cron=s["cron"], timezone=s["timezone"])
    assert set(seen) == {"search/ui", "search-rerun/nightly", "export/ui", "ingest/ui", "relabel/ui", "stages/gpu",
                         "merge/gpu", "finetune/gpu", "generate/gpu"}
    for stage in ("stages", "merge", "finetune", "generate"):
        assert seen[f"{stage}/gpu"]["work_pool"]["name"] == gpu_pool
    assert (ROOT / seen["search/ui"]["parameters"]["config"]).is_file()
    assert seen["search-rerun/nightly"]["schedules"][0]["active"] is True


def test_search_takes_a_typed_form_or_a_path():
    from prefect.utilities.callables import parameter_schema

    from flows.search import search

    schema = parameter_schema(search).model_dump()
    assert "SearchConfig" in schema["definitions"]  # the UI renders the config as a form
    kinds = {next(iter(v)) if "$ref" not in v else "ref" for v in schema["properties"]["config"]["anyOf"]}
    assert kinds == {"ref", "type"}
    params = search.validate_parameters({"config": "configs/demo.yaml"})
    assert params["config"] == "configs/demo.yaml"
    from tasks.config.schema import load_config

    form = load_config(ROOT / "configs" / "demo.yaml").model_dump(mode="json")
    assert search.validate_parameters({"config": form})["config"].name == "demo"


def _apply_module():
    """deployments/apply.py as a module (the folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("deployments_apply", ROOT / "deployments" / "apply.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_search_form_starts_from_the_demo_config(deployments):
    from flows.search import search
    from tasks.config.schema import SearchConfig, load_config
    from tasks.config.stages import FinetuneConfig

    spec = _apply_module().deployment_spec()
    deployed = next(d for d in spec["deployments"] if d["entrypoint"] == "flows/search.py:search")
    assert next(d for d in deployments if d["entrypoint"] == "flows/search.py:search")["parameters"]["config"] == \
        "configs/demo.yaml"  # the file names the config; apply.py deploys its values
    form = deployed["parameters"]["config"]
    demo = load_config(ROOT / "configs" / "demo.yaml")
    # The form's paths are relative to the repository root (the worker's working folder); resolved there, the form
    # is exactly what load_config makes of the demo.
    assert form["datasets"][0]["train"] == "configs/demo_data/extraction_train.jsonl"
    absolute = json.loads(json.dumps(form))
    for d in [*absolute["datasets"], absolute["validation"]["dataset"]]:
        d["train"], d["test"] = str(ROOT / d["train"]), str(ROOT / d["test"])
        assert Path(d["train"]).is_file() and Path(d["test"]).is_file()
    assert SearchConfig.model_validate(absolute) == demo
    # the demo's values, not the library's defaults; the merge recipes filled in
    assert form["finetune"]["lora_r"] == 16 != FinetuneConfig().lora_r
    assert form["finetune"]["learning_rate"] == 0.003 != FinetuneConfig().learning_rate
    assert [m["recipe"]["merge_method"] for m in form["merges"]] == ["slerp", "ties"]
    assert search.validate_parameters({"config": form})["config"].name == "demo"  # the flow accepts it as a form
    assert "working folder" in deployed["description"]
    assert "working folder" in SearchConfig.model_json_schema()["$defs"]["DatasetSpec"]["properties"]["train"][
        "description"]


def test_a_users_mistake_fails_the_flow_run_in_one_line(tmp_path, tiny_models, tiny_data):
    import logging

    import flows.cli  # noqa: F401  (conftest stops the temporary server this test starts through it)
    from flows.failures import DropOneLineTracebacks
    from flows.search import search
    from tasks.config.schema import SearchConfig
    from tasks.core.errors import UserError
    from tests.conftest import mini_config_dict

    cfg = mini_config_dict(tiny_models, tiny_data)
    cfg["datasets"][0]["train"] = str(tmp_path / "missing.jsonl")  # a wrong path typed into the UI's form
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("prefect.flow_runs").addHandler(handler)
    try:
        state = search(SearchConfig.model_validate(cfg), str(tmp_path / "store"), return_state=True)
        with pytest.raises(UserError, match="missing.jsonl: dataset file not found"):  # what the command line prints
            search(SearchConfig.model_validate(cfg), str(tmp_path / "store"))
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(handler)
    assert state.is_failed() and state.message == f"{tmp_path / 'missing.jsonl'}: dataset file not found"
    assert [r.getMessage() for r in records if r.levelno >= logging.ERROR][0] == f"error: {state.message}"
    assert not [r for r in records if r.exc_info], "a traceback in the flow run's log"
    # the worker's engine re-raises the Failed state's exception and logs it with a traceback: that record is left out
    with pytest.raises(UserError) as raised:
        state.result()
    engine_record = logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1,
                                      "Engine execution exited with unexpected exception", None,
                                      (UserError, raised.value, raised.value.__traceback__))
    assert not DropOneLineTracebacks().filter(engine_record)
    assert DropOneLineTracebacks().filter(logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "bug",
                                                            None, (ValueError, ValueError("x"), None)))
