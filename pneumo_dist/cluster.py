"""The Ray cluster a search runs on, as its autoscaler config (cluster/gpu.yaml) describes it, checked
against a run config before Ray starts: every trial's workers fit a node type, GPU recipes ask for GPUs,
and a cluster that can grow past one node keeps its results in a bucket. No Ray and no TensorFlow here.

On a cluster started with `ray up`, the head holds its config as ~/ray_bootstrap_config.yaml, which a
job submitted with `ray job submit` finds there (jobs/tune.py --cluster-config names another).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import yaml

from pneumo_dist import storage
from pneumo_dist.config import ConfigError, RunConfig, TuneConfig

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # written on the head by `ray up`


@dataclass(frozen=True)
class NodeType:
    name: str
    cpus: float
    gpus: float

    def holds(self, cpus: float, gpus: float) -> bool:
        return cpus <= self.cpus and gpus <= self.gpus

    def describe(self) -> str:
        return f"{self.name} ({self.cpus:g} CPU, {self.gpus:g} GPU)"


@dataclass(frozen=True)
class Cluster:
    source: str  # the config file
    node_types: list[NodeType]  # those that declare their resources
    max_workers: int  # worker nodes the autoscaler may start in all

    @classmethod
    def read(cls, path: str) -> Cluster:
        """A Ray cluster config's node types and their resources (Ray's `available_node_types`). A node
        type that declares no resources (Ray detects them when the node starts) is left out; so are all
        of a config of Ray's local provider without node types (its workers are `worker_ips`)."""
        try:
            with open(os.path.expanduser(path)) as file:
                raw = yaml.safe_load(file)
            provider = raw.get("provider", {})
            if "available_node_types" not in raw and provider.get("type") == "local":
                workers = len(provider.get("worker_ips", []))
                return cls(source=path, node_types=[], max_workers=workers)
            types = [
                NodeType(
                    name=str(name),
                    cpus=float(spec["resources"].get("CPU", 0)),
                    gpus=float(spec["resources"].get("GPU", 0)),
                )
                for name, spec in raw["available_node_types"].items()
                if spec.get("resources")
            ]
            return cls(source=path, node_types=types, max_workers=int(raw.get("max_workers", 0)))
        except OSError as error:
            raise ConfigError(f"{path}: cannot read the cluster config ({error.strerror})") from None
        except (yaml.YAMLError, KeyError, TypeError, AttributeError, ValueError) as error:
            raise ConfigError(
                f"{path}: not a Ray cluster config with available_node_types ({error!r})"
            ) from None

    def describe_node_types(self) -> str:
        return ", ".join(t.describe() for t in self.node_types)


def find(explicit: str | None) -> Cluster | None:
    """The cluster config named by `explicit`, else the head's bootstrap config when this runs on a head
    started by `ray up`, else None (a laptop, or a cluster whose config is not at hand)."""
    if explicit:
        return Cluster.read(explicit)
    if os.path.exists(os.path.expanduser(BOOTSTRAP_CONFIG)):
        return Cluster.read(BOOTSTRAP_CONFIG)
    return None


def check(config: RunConfig, cluster: Cluster) -> None:
    """Refuse, before Ray starts, a search that could not run as configured on `cluster`."""
    check_fits(config.tune, cluster)
    check_storage(config.tune, cluster)


def check_fits(tune: TuneConfig, cluster: Cluster) -> None:
    """A trial worker that fits no node type would wait forever: Ray queues it and the autoscaler
    starts no node for it."""
    known = cluster.node_types
    if known and not any(t.holds(tune.cpus_per_worker, tune.gpus_per_worker) for t in known):
        raise ConfigError(
            f"a trial worker asks for {worker_request(tune)}, which no node type of {cluster.source} "
            f"holds ({cluster.describe_node_types()}): lower tune.cpus_per_worker / tune.gpus_per_worker"
        )


def check_storage(tune: TuneConfig, cluster: Cluster) -> None:
    """A local tune.storage_uri on a cluster that may grow past its head: checkpoints and results would
    stay on whichever node wrote them (tune.check_storage sees only the nodes up at the start)."""
    if cluster.max_workers > 0 and not storage.is_gcs(tune.storage_uri):
        raise ConfigError(
            f"tune.storage_uri={tune.storage_uri} is a local folder, but {cluster.source} can start up to "
            f"{cluster.max_workers} worker nodes: checkpoints and results would stay on whichever node "
            "wrote them; use a gs:// URI"
        )


def worker_request(tune: TuneConfig) -> str:
    return f"{tune.cpus_per_worker:g} CPU + {tune.gpus_per_worker:g} GPU"
