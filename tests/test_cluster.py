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


def shipped_configs() -> list:
    return sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: p.name)
def test_every_shipped_config_fits_a_node_type_of_the_gpu_cluster_and_gpu_recipes_ask_for_gpus(path):
    from pneumo_dist import cluster
    from pneumo_dist import config as config_lib

    config = config_lib.load_config(str(path))
    gpu_cluster = cluster.Cluster.read(str(REPO / "cluster" / "gpu.yaml"))
    cluster.check_fits(config.tune, gpu_cluster)
    if config.gpu_recipe_reasons():
        assert config.tune.gpus_per_worker >= 1 and not config.warnings(), path.name
        cluster.check(config, gpu_cluster)  # its results go to a bucket too


def test_the_kaggle_recipe_is_a_gpu_recipe_of_one_gpu_per_trial():
    from pneumo_dist import config as config_lib

    config = config_lib.load_config(str(REPO / "configs" / "kaggle.yaml"))
    assert config.gpu_recipe_reasons() and config.tune.workers_per_trial == 1
    assert config.tune.gpus_per_worker == 1


def test_a_trial_that_fits_no_node_type_or_a_local_storage_on_a_growing_cluster_is_refused(tmp_path):
    from pneumo_dist import cluster
    from pneumo_dist import config as config_lib

    gpu_cluster = cluster.Cluster.read(str(REPO / "cluster" / "gpu.yaml"))
    too_big = config_lib.load_config(None, ["tune.gpus_per_worker=16", "tune.cpus_per_worker=8"])
    with pytest.raises(
        config_lib.ConfigError, match=r"asks for 8 CPU \+ 16 GPU.*gpu_h100_8 \(208 CPU, 8 GPU\)"
    ):
        cluster.check_fits(too_big.tune, gpu_cluster)
    local = config_lib.load_config(None, ["tune.storage_uri=outputs/tune"])
    with pytest.raises(config_lib.ConfigError, match="local folder.*up to 8 worker nodes"):
        cluster.check_storage(local.tune, gpu_cluster)
    on_premises = cluster.Cluster.read(str(REPO / "cluster" / "local.yaml"))  # its two worker_ips
    with pytest.raises(config_lib.ConfigError, match="up to 2 worker nodes"):
        cluster.check(local, on_premises)
    broken = tmp_path / "broken.yaml"
    broken.write_text("cluster_name: x\n")
    with pytest.raises(config_lib.ConfigError, match="broken.yaml: not a Ray cluster config"):
        cluster.Cluster.read(str(broken))


def test_a_gpu_recipe_on_cpu_only_trials_is_warned_of():
    from pneumo_dist import config as config_lib

    config = config_lib.load_config(str(REPO / "configs" / "kaggle.yaml"), ["tune.gpus_per_worker=0"])
    (warning,) = [w for w in config.warnings() if "GPU recipe" in w]
    assert "model.weights imagenet" in warning and "data.image_size_px 224" in warning
    demo = config_lib.load_config(str(REPO / "configs" / "demo.yaml"))
    assert not [w for w in demo.warnings() if "GPU recipe" in w]


def test_each_ray_worker_gives_tensorflow_only_its_own_gpu_of_those_it_sees():
    from pneumo_dist import distribute

    assert distribute.own_gpu_indices("0,1,2,3,4,5,6,7", ["5"]) == [5]
    assert distribute.own_gpu_indices("4,5,6,7", ["6", "7"]) == [2, 3]
    assert distribute.own_gpu_indices("3", ["3"]) is None  # Ray's own restriction: nothing to do
    assert distribute.own_gpu_indices(None, []) is None and distribute.own_gpu_indices("0,1", []) is None


def test_multi_worker_trials_share_the_nodes_gpus_for_nccls_peer_to_peer():
    from pneumo_dist import ray_setup

    assert ray_setup.gpu_sharing_tensorflow_config().backend_cls.share_cuda_visible_devices


def test_the_search_job_checks_the_cluster_config_before_ray_starts():
    import subprocess
    import sys

    completed = subprocess.run(
        [
            sys.executable,
            "jobs/tune.py",
            "--config",
            "configs/demo.yaml",
            "--cluster-config",
            "cluster/gpu.yaml",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        "tune: error: tune.storage_uri=outputs/tune is a local folder, but cluster/gpu.yaml can start up to "
        "8 worker nodes: checkpoints and results would stay on whichever node wrote them; use a gs:// URI"
    ]
