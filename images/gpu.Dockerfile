# syntax=docker/dockerfile:1.7
# The GPU image for preprocessing and training: slim Python, the torch release the tests run
# (the Makefile's TORCH; its Linux wheels from PyPI carry CUDA and cuDNN and pin their
# Triton), and trajflow with its `ml` extra. The node's driver comes in through the NVIDIA
# container runtime.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG TORCH_VERSION=2.13.0

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2.post1
COPY workloads/ /src/workloads/
RUN python -m build --wheel --outdir /wheels /src/workloads

FROM ${PYTHON_IMAGE}
ARG TORCH_VERSION
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="trajflow-gpu" \
      org.opencontainers.image.description="trajflow preprocessing (Triton resampling) and training (PyTorch DDP)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/trajflow/trajflow"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    TRITON_CACHE_DIR=/tmp/triton \
    MPLCONFIGDIR=/tmp/matplotlib
# Triton builds its CUDA launcher with the host C compiler the first time a kernel runs;
# slim images have none. The compiler follows the base image's distribution.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels/ /wheels/
# The wheel was built above from this commit; an extra cannot be named on a glob. The
# checks: the torch the tests run, and an elastic agent that reads the shutdown timeout the
# training chart sets (TORCH_ELASTIC_SHUTDOWN_TIMEOUT; older ones kill after 30 s).
# hadolint ignore=DL3013
RUN WHEEL="$(ls /wheels/trajflow-*.whl)" \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" "${WHEEL}[ml]" && rm -rf /wheels \
    && python -c "import torch, triton; print(torch.__version__, triton.__version__); \
assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__; \
from torch.distributed.launcher.api import LaunchConfig; \
assert 'shutdown_timeout' in LaunchConfig.__dataclass_fields__" \
    && command -v gcc \
    && groupadd --gid 65532 trajflow \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin trajflow
USER 65532:65532
ENTRYPOINT ["trajflow"]
CMD ["--help"]
