# GPU image for the Ray nodes of cluster/gpu.yaml and cluster/local.yaml.
#
# TensorFlow 2.21's GPU build wants CUDA 12.5 and cuDNN 9.3: `pip install .[gpu]`
# (tensorflow[and-cuda]) brings exactly those as NVIDIA wheels, so the base image needs only CUDA 12.5's
# container plumbing (the host's NVIDIA driver is mounted by `docker run --gpus all`).
# Build and push (see the README's cluster guide):
#   docker build -t REGION-docker.pkg.dev/PROJECT/pneumo-dist/pneumo-dist:0.1.0 .
FROM nvidia/cuda:12.5.1-base-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_USE_LEGACY_KERAS=1 \
    RAY_AUTH_MODE=token \
    TF_CPP_MIN_LOG_LEVEL=2 \
    TF_GPU_THREAD_MODE=gpu_private \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python 3.11 (the project's version), and what Ray's cluster launcher runs on a node: ssh, rsync.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv openssh-client rsync \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv "$VIRTUAL_ENV"

# Dependencies first, in their own layer: code changes do not reinstall TensorFlow.
WORKDIR /opt/pneumo-dist
COPY pyproject.toml README.md ./
COPY pneumo_dist/__init__.py pneumo_dist/__init__.py
RUN pip install --upgrade pip && pip install ".[gpu]"

COPY pneumo_dist pneumo_dist
COPY jobs jobs
COPY configs configs
COPY cluster cluster
RUN pip install --no-deps .

# Ray's cluster launcher runs commands as this user (cluster/*.yaml: docker.run_options). It gets no sudo:
# whatever needs root happens above, at build time. No credentials in the image: nodes use their
# service account (GCP) or mounted keys, and the Ray token comes through file_mounts.
RUN useradd --create-home --shell /bin/bash --uid 1000 ray \
    && mkdir -p /home/ray/.ray && chown ray /home/ray/.ray && chmod 700 /home/ray/.ray \
    && chown -R ray /opt/pneumo-dist "$VIRTUAL_ENV"
USER ray
WORKDIR /home/ray
