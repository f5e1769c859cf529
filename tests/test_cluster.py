"""The cluster files, checked statically: Ray's own cluster-config validation, GPUs, the Dockerfile.
(No Docker engine or cloud here: `docker build` and `ray up` themselves are not run.)"""

import re

import pytest
import ray
import yaml

from .conftest import REPO

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


def test_the_image_grants_its_user_no_root():
    text = (REPO / "Dockerfile").read_text()
    assert not re.search(r"NOPASSWD|sudoers", text), "the non-root user must not get root back"
    assert not re.search(r"apt-get install[^\n]*\bsudo\b", text)


@pytest.mark.parametrize("name", ["gpu.yaml", "local.yaml"])
def test_every_ray_endpoint_needs_the_token_and_the_dashboard_stays_on_loopback(name):
    config = yaml.safe_load((REPO / "cluster" / name).read_text())
    starts = [
        c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "start" in c
    ]
    assert len(starts) == 2
    for command in starts:
        assert command.startswith("RAY_AUTH_MODE=token ray start "), command
    (head,) = [c for c in starts if "--head" in c]
    assert re.search(r"--dashboard-host=(127\.0\.0\.1|localhost)\b", head), head
    assert not re.search(r"0\.0\.0\.0", (REPO / "cluster" / name).read_text())
    # Every node gets the token at Ray's default path (file_mounts), and every process in the image runs
    # in token mode: drivers that `ray job submit` starts, `ray exec` commands.
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert re.search(r"^\s+RAY_AUTH_MODE=token\b", (REPO / "Dockerfile").read_text(), re.MULTILINE)


@pytest.mark.parametrize("name", ["gpu.yaml", "local.yaml"])
def test_file_mounts_ship_the_code_without_data_outputs_or_history(name):
    config = ray_validate(yaml.safe_load((REPO / "cluster" / name).read_text()))
    assert config["file_mounts"]["/home/ray/pneumo-dist"] == "."
    assert {"/.git/", "/data/", "/outputs/"} <= set(config["rsync_exclude"])
    assert config["rsync_filter"] == [".gitignore"]
