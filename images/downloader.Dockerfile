# syntax=docker/dockerfile:1.7
# The downloader image: the trajflow base install on slim Python, no torch.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2.post1
COPY workloads/ /src/workloads/
RUN python -m build --wheel --outdir /wheels /src/workloads

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="trajflow-downloader" \
      org.opencontainers.image.description="trajflow downloader: partitioned, resumable, verified dataset download" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/trajflow/trajflow"
# HOME and TMPDIR point at /tmp, which the chart mounts as an emptyDir: the root
# filesystem stays read-only.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    TMPDIR=/tmp
COPY --from=build /wheels/ /wheels/
RUN pip install --no-cache-dir /wheels/trajflow-*.whl && rm -rf /wheels \
    && groupadd --gid 65532 trajflow \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin trajflow
USER 65532:65532
ENTRYPOINT ["trajflow"]
CMD ["--help"]
