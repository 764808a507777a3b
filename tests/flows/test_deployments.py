"""deployments/prefect.yaml names real flows with valid parameters and schedules; `refit serve`
registers the nightly schedule and one rerun deployment per stage with a Prefect server."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO, prepare

from refit.stages.core.config import load_recipe
from refit.stages.pipeline import NAMES as STAGES


def test_prefect_yaml_deploys_the_nightly_refresh_and_every_stage():
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    for deployment in deployments.values():
        flow = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
        flow.validate_parameters(deployment["parameters"])  # every parameter is one the flow takes
        assert set(deployment["parameters"]) <= set(flow.parameters.properties)
        load_recipe(REPO / deployment["parameters"]["recipe"], check_files=False)
    assert {d["entrypoint"].split(":")[1] for d in deployments.values()} == {"refresh", *(f"{s}_flow" for s in STAGES)}
    (schedule,) = deployments["demo-nightly"]["schedules"]
    assert CronSchedule(**schedule).timezone == "Europe/Berlin"  # validates the cron expression too
    pools = {name: d["work_pool"]["name"] for name, d in deployments.items()}
    assert pools["demo-nightly"] == pools["demo-train"] == "refit-gpu" and pools["demo-curate"] == "refit-cpu"


@pytest.mark.slow
@pytest.mark.parametrize("tiny_model_dir", ["llama"], indirect=True)
def test_serve_registers_the_nightly_schedule_and_the_stage_reruns(prefect_harness, tmp_path, tiny_model_dir):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    path, _ = prepare(tmp_path, tiny_model_dir, run_data_stages=False)
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "refit.flows.cli",
            "serve",
            str(path),
            "--cron",
            "30 3 * * *",
            "--timezone",
            "Europe/Berlin",
        ],
        cwd=REPO,
        env=env,
    )
    try:
        with get_client(sync_client=True) as client:

            def registered(name: str, timeout: float = 90):
                deadline = time.time() + timeout
                while time.time() < deadline and process.poll() is None:
                    try:
                        return client.read_deployment_by_name(name)
                    except Exception:  # not registered yet
                        time.sleep(1)
                raise AssertionError(f"refit serve did not register {name}")

            nightly = registered("refit-refresh/t-nightly")
            (schedule,) = nightly.schedules
            assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == (
                "30 3 * * *",
                "Europe/Berlin",
                True,
            )
            assert nightly.parameters == {"recipe": str(path.resolve()), "wait": True}
            for stage in STAGES:
                rerun = registered(f"refit-{stage}/t-{stage}")
                assert rerun.parameters["force"] is True and not rerun.schedules
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_rejects_a_bad_schedule_before_registering_anything(capsys):
    from refit.flows.cli import main as refit

    assert refit(["serve", str(REPO / "deployments" / "demo.yaml"), "--cron", "61 * * * *"]) == 2
    assert "--cron" in capsys.readouterr().err
    assert refit(["serve", str(REPO / "deployments" / "demo.yaml"), "--timezone", "Mars/Olympus"]) == 2
