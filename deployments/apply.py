"""Apply basesearch's deployments with one command: create the missing work pools, then `prefect deploy --all`.

    python deployments/apply.py                      # process pools (laptop, or a worker on a GPU box)
    python deployments/apply.py --gpu-pool-type kubernetes   # the GPU pool runs each stage as a Kubernetes job
                                                     # with infra/k8s-gpu-job-template.json (needs prefect-kubernetes)
    python deployments/apply.py --gpu-pool-type docker   # each stage run a container with one GPU
                                                     # (infra/docker-gpu-job-template.json; needs prefect-docker)

Run it where the workers will find the code (deployments record this folder; see infra/README.md).
PREFECT_API_URL (and PREFECT_API_AUTH_STRING when the server has one) say which server.

The search deployment's `config` default in prefect.yaml names a YAML file; this script deploys that file's
checked values instead (deployment_spec), so the UI's typed form starts filled in with them (the demo's LoRA rank,
learning rate, merge recipes...) rather than empty with the library's defaults. A plain `prefect deploy` gets
the path, which the flow reads the same way.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent  # the repository root: entrypoints are relative to it
PREFECT_FILE = Path("deployments/prefect.yaml")
K8S_TEMPLATE = Path("infra/k8s-gpu-job-template.json")
DOCKER_TEMPLATE = Path("infra/docker-gpu-job-template.json")  # one GPU per container (device_requests), the cache
GPU_TEMPLATES = {"kubernetes": K8S_TEMPLATE, "docker": DOCKER_TEMPLATE}
SEARCH_ENTRYPOINT = "flows/search.py:search"  # its `config` takes a typed form or a path
FORM_NOTE = (" The form starts from {path}'s values. Its paths (datasets, templates) are relative to the worker's "
             "working folder: the repository root the deployments were applied from.")


def work_pools(prefect_file: Path) -> dict[str, str]:
    """Pool name -> role ('cpu' or 'gpu', the key under definitions.work_pools) in a prefect.yaml."""
    spec = yaml.safe_load((ROOT / prefect_file).read_text())
    return {pool["name"]: role for role, pool in spec["definitions"]["work_pools"].items()}


def relative_to_root(value: Any) -> Any:
    """`value` with every absolute path under the repository root made relative to it (walks dicts and lists)."""
    if isinstance(value, dict):
        return {k: relative_to_root(v) for k, v in value.items()}
    if isinstance(value, list):
        return [relative_to_root(v) for v in value]
    if isinstance(value, str) and value.startswith(f"{ROOT}{os.sep}"):
        return Path(value).relative_to(ROOT).as_posix()
    return value


def config_form(path: str | Path) -> dict[str, Any]:
    """A config file as the search flow's typed form: load_config's checked values, paths relative to the root."""
    from tasks.config.schema import load_config

    return relative_to_root(load_config(ROOT / path).model_dump(mode="json"))


def deployment_spec(prefect_file: Path = PREFECT_FILE) -> dict[str, Any]:
    """prefect.yaml as deployed: the search deployments' `config` path replaced by that config's form."""
    spec = yaml.safe_load((ROOT / prefect_file).read_text())
    for d in spec["deployments"]:
        path = (d.get("parameters") or {}).get("config")
        if d["entrypoint"] == SEARCH_ENTRYPOINT and isinstance(path, str):
            d["parameters"]["config"] = config_form(path)
            d["description"] = d.get("description", "").rstrip() + FORM_NOTE.format(path=path)
    return spec


def prefect(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the prefect CLI (of this Python) in the repository root, capturing its output."""
    cmd = [sys.executable, "-m", "prefect", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ | {"PREFECT_CLI_PROMPT": "false"})
    if check and out.returncode != 0:
        tail = (out.stdout + out.stderr).strip().splitlines()[-15:]
        raise SystemExit(f"error: `prefect {' '.join(args)}` failed:\n" + "\n".join(tail))
    return out


def ensure_pool(name: str, pool_type: str, template: Path | None) -> bool:
    """Create work pool `name` unless it exists; True when it was created."""
    if prefect("work-pool", "inspect", name, check=False).returncode == 0:
        return False
    args = ["work-pool", "create", name, "--type", pool_type]
    if template:
        args += ["--base-job-template", str(template)]
    prefect(*args)
    return True


def main(argv: list[str] | None = None) -> int:
    """Create missing pools, deploy everything in deployments/prefect.yaml, print what was applied."""
    parser = argparse.ArgumentParser(prog="python deployments/apply.py", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-pool-type", default="process", help="worker type of the search's pool (default process)")
    parser.add_argument("--gpu-pool-type", default="process", choices=["process", "kubernetes", "docker"],
                        help="worker type of the GPU stages' pool (default process)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tasks.core.errors import UserError
    from tasks.plan.pool import check_server

    try:
        url = check_server()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, role in work_pools(PREFECT_FILE).items():
        kind = args.gpu_pool_type if role == "gpu" else args.cpu_pool_type
        if ensure_pool(name, kind, GPU_TEMPLATES.get(kind) if role == "gpu" else None):
            print(f"created work pool '{name}' ({kind})")
    spec = deployment_spec()
    with tempfile.TemporaryDirectory() as tmp:  # prefect reads its file only: entrypoints are relative to ROOT
        resolved = Path(tmp) / "prefect.yaml"
        resolved.write_text(yaml.safe_dump(spec, sort_keys=False))
        prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(resolved))
    count = len(spec["deployments"])
    print(f"applied {count} deployments from {PREFECT_FILE} to {url}")
    print("start the workers:  " + "   ".join(f"prefect worker start --pool {p}" for p in work_pools(PREFECT_FILE)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
