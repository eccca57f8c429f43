# syntax=docker/dockerfile:1.7
# The GPU image for preprocessing and training: CUDA PyTorch runtime (with Triton) plus
# trajflow and its `ml` extra. Torch comes from the base image and is not reinstalled.
ARG TORCH_IMAGE=pytorch/pytorch:2.8.0-cuda12.9-cudnn9-runtime

FROM ${TORCH_IMAGE} AS build
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2.post1
COPY workloads/ /src/workloads/
RUN python -m build --wheel --outdir /wheels /src/workloads

FROM ${TORCH_IMAGE}
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
# the runtime base image has none. The compiler follows the base image's distribution.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels/ /wheels/
# The base image's torch satisfies the extra's torch requirement, so pip keeps it.
# The wheel was built above from this commit; an extra cannot be named on a glob.
# hadolint ignore=DL3013
RUN WHEEL="$(ls /wheels/trajflow-*.whl)" \
    && pip install --no-cache-dir "${WHEEL}[ml]" && rm -rf /wheels \
    && python -c "import torch, triton; print(torch.__version__, triton.__version__)" \
    && command -v gcc \
    && groupadd --gid 65532 trajflow \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin trajflow
USER 65532:65532
ENTRYPOINT ["trajflow"]
CMD ["--help"]
