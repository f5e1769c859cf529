"""Ray at the edge: joining the cluster this process runs on (or starting Ray in it), and Ray Train's
TensorFlow backend set up for several GPU workers on a node. tune.py, batch_scoring.py and the benchmarks
use it; nothing else imports Ray."""

from __future__ import annotations

from pneumo_dist.errors import PneumoDistError


class RaySetupError(PneumoDistError):
    """Ray cannot be joined where the user said; the message says where."""


# What a quiet worker leaves out: TensorFlow's C++ start-up lines (CUDA probing, CPU features).
QUIET_WORKER_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}


def connect_ray(address: str | None = None, verbose: bool = False) -> str:
    """Join the cluster this process runs on (a `ray job submit` job, RAY_ADDRESS, or a Ray already
    running on this machine), else start Ray in this process: the laptop default. `address="local"`
    always starts a private in-process Ray. Returns "cluster" or "in-process".

    Unless `verbose`, the workers' own output stays in Ray's log files (`/tmp/ray/session_latest/logs`)
    instead of the console, and Ray logs errors only; failed trials are reported all the same
    (`console_reporter`). An in-process Ray also quietens TensorFlow in its workers; on a cluster the
    image does (Dockerfile)."""
    import logging

    import ray

    if ray.is_initialized():
        return "cluster"
    # (ERROR: Ray's start-up warnings, such as the token-authentication notice, stay in its log files.)
    quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.ERROR}
    private = {} if verbose else {"runtime_env": {"env_vars": QUIET_WORKER_ENV}}
    if address == "local":
        ray.init(address="local", **quiet, **private)
        return "in-process"
    try:
        # (No runtime_env here: a submitted job's own, with its working_dir, must stay as it is.)
        ray.init(address=address or "auto", **quiet)
        return "cluster"
    except (ConnectionError, ValueError) as error:  # ValueError: an address Ray cannot parse
        if address not in (None, "auto"):
            raise RaySetupError(f"--address {address}: no Ray cluster to join there ({error})") from None
    ray.init(address="local", **quiet, **private)
    return "in-process"


def ray_gpu_ids() -> list[str]:
    """The GPU ids Ray gave this worker, as CUDA_VISIBLE_DEVICES spells them."""
    import ray

    return [str(gpu) for gpu in ray.get_gpu_ids()]


def gpu_sharing_tensorflow_config():
    """Ray Train's TensorFlow backend with every GPU of a node visible to each of its workers there
    (CUDA_VISIBLE_DEVICES of them all), as Ray's PyTorch backend does: NCCL reaches another process's
    GPU peer to peer (NVLink, PCIe) only if that GPU is visible to it, and through host memory
    otherwise. Each worker then makes only its own GPU visible to TensorFlow (train_trial), so that
    MultiWorkerMirroredStrategy still has one replica per process."""
    from ray.train.tensorflow import TensorflowConfig
    from ray.train.tensorflow.config import _TensorflowBackend

    class SharedGpuBackend(_TensorflowBackend):
        share_cuda_visible_devices = True

    class SharedGpuConfig(TensorflowConfig):
        @property
        def backend_cls(self):
            return SharedGpuBackend

    return SharedGpuConfig()
