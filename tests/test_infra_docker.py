"""The Docker work pool example (infra/docker-gpu-job-template.json), checked as far as configuration goes: a valid
base job template for prefect-docker's worker, and the job variables reach the container's create arguments as
docker-py builds them (one GPU through device_requests, the cache volume, the shared memory), with no Docker
daemon."""

from __future__ import annotations

import json
from pathlib import Path
from unittest.mock import MagicMock

from prefect.server.schemas.actions import validate_base_job_template
from prefect.utilities.templating import apply_values
from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = json.loads((ROOT / "infra" / "docker-gpu-job-template.json").read_text())


def create_args(**job_variables) -> dict:
    """docker-py's create_container arguments for a stage run with these job variables (defaults elsewhere)."""
    from docker.models.containers import _create_container_args

    props = TEMPLATE["variables"]["properties"]
    values = {k: v["default"] for k, v in props.items() if "default" in v} | job_variables
    rendered = apply_values(TEMPLATE["job_configuration"], values, remove_notset=True)
    cfg = DockerWorkerJobConfiguration(**rendered)
    client = MagicMock()
    client.version.return_value = {"Version": "27.3.1", "ApiVersion": "1.47"}  # what a daemon reports
    settings = DockerWorker(work_pool_name="gpu")._build_container_settings(client, cfg)
    settings["version"] = "1.45"  # the daemon's API version, which docker-py's client passes
    return _create_container_args(settings)


def test_the_template_is_a_docker_pool_template():
    validate_base_job_template(TEMPLATE)  # every placeholder a declared variable
    default = DockerWorker.get_default_base_job_template()
    # every setting of prefect-docker's own template is still there, under its name
    assert set(default["variables"]["properties"]) <= set(TEMPLATE["variables"]["properties"])
    assert set(default["job_configuration"]) == set(TEMPLATE["job_configuration"])
    for name, spec in TEMPLATE["variables"]["properties"].items():
        assert spec.get("description"), name


def test_each_stage_run_gets_one_gpu_the_cache_and_shared_memory():
    args = create_args()
    host = args["host_config"]
    assert host["DeviceRequests"] == [{"Driver": "nvidia", "Count": 0, "DeviceIDs": ["0"],
                                       "Capabilities": [["gpu"]], "Options": {}}]
    assert host["ShmSize"] == 8 * 1024**3
    assert host["Binds"] == ["basesearch-cache:/cache"]
    assert args["environment"]["BASESEARCH_CACHE_DIR"] == "/cache" and args["image"] == "basesearch:latest"


def test_job_variables_reach_the_create_arguments():
    args = create_args(gpu_device_ids=["GPU-5f3c"], shm_size="2g", image="registry/basesearch:1",
                       env={"AWS_DEFAULT_REGION": "eu-west-1", "BASESEARCH_CACHE_DIR": "/cache"})
    host = args["host_config"]
    assert host["DeviceRequests"][0]["DeviceIDs"] == ["GPU-5f3c"] and host["ShmSize"] == 2 * 1024**3
    assert args["image"] == "registry/basesearch:1" and args["environment"]["AWS_DEFAULT_REGION"] == "eu-west-1"
