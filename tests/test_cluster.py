"""The cluster files, checked statically: Ray's own cluster-config validation, GPUs, the Dockerfile.
(No Docker engine or cloud here: `docker build` and `ray up` themselves are not run.)"""

import re
from pathlib import Path

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
# GPUs that come with a Google Cloud machine type (g2, a2, a3 bundle theirs).
BUNDLED_GPUS = {"g2-standard-8": 1, "a2-highgpu-1g": 1, "a3-highgpu-8g": 8, "n2-standard-8": 0}


def ray_validate(config: dict) -> dict:
    """What `ray up` does before it starts anything: fill in defaults, then check against Ray's schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name", ["gpu.yaml", "local.yaml"])
def test_cluster_configs_pass_rays_validation(name):
    ray_validate(yaml.safe_load((REPO / "cluster" / name).read_text()))


def test_a_typo_in_a_cluster_config_fails_validation():
    config = yaml.safe_load((REPO / "cluster" / "gpu.yaml").read_text())
    config["idle_timeout_minute"] = config.pop("idle_timeout_minutes")
    with pytest.raises(Exception, match="idle_timeout_minute"):
        ray_validate(config)


def test_gpu_worker_types_declare_the_gpus_their_machines_have():
    config = yaml.safe_load((REPO / "cluster" / "gpu.yaml").read_text())
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        attached = sum(a["acceleratorCount"] for a in node.get("guestAccelerators", []))
        expected = attached or BUNDLED_GPUS[node["machineType"]]
        assert node_type["resources"].get("GPU", 0) == expected, name
        if expected:
            assert node["scheduling"] == [{"onHostMaintenance": "TERMINATE"}], (
                name
            )  # GPUs cannot live-migrate


def test_no_credentials_in_the_cluster_files():
    for path in [REPO / "Dockerfile", *(REPO / "cluster").glob("*.yaml")]:
        text = path.read_text()
        assert "GOOGLE_APPLICATION_CREDENTIALS" not in text and "private_key" not in text.replace(
            "ssh_private_key", ""
        )


def test_dockerfile_pins_its_base_and_does_not_run_as_root():
    text = (REPO / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    image, _, tag = base.partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), base
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")


def test_the_image_installs_the_ray_version_of_the_client():
    pyproject = (REPO / "pyproject.toml").read_text()
    (pinned,) = re.findall(r'"ray\[[a-z,]+\]==([\d.]+)\.\*"', pyproject)
    assert ray.__version__.startswith(pinned + "."), (ray.__version__, pinned)
    assert 'pip install ".[gpu]"' in (REPO / "Dockerfile").read_text()
