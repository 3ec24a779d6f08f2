# syntax=docker/dockerfile:1
# mqtt-bridge: the wheel is built in a throwaway stage and installed into python:3.11-slim.
# The runtime runs as uid 10001 and writes nothing to disk, so `--read-only` works.
#   docker build -t mqtt-bridge .
#   docker run --read-only -v $PWD/dtb.yaml:/etc/mqtt-bridge/config.yaml:ro mqtt-bridge
# `docker stop` waits 10 s by default: give it more than shutdown.deadline (`-t 30`).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# Only what the wheel needs (README.md is the package's long description).
COPY pyproject.toml README.md ./
COPY bridge ./bridge
# Our wheel and a wheel of every dependency: the runtime stage installs from here, offline.
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="mqtt-bridge" \
      org.opencontainers.image.description="At-least-once MQTT republish bridge (DTB/BTD) for broker migrations" \
      org.opencontainers.image.licenses="Apache-2.0"
# PYTHONDONTWRITEBYTECODE: no __pycache__ writes at run time (pip compiled the .pyc files
# at install time, into the image). The HTTP endpoints must be reachable from outside the
# container; every other setting comes from the config file or BRIDGE_* variables.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BRIDGE_HTTP__LISTEN=0.0.0.0:9100
# A bind mount from the builder keeps the wheels out of the image's layers.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels mqtt-bridge \
 && groupadd --system --gid 10001 bridge \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin bridge
# Numeric, so Kubernetes' runAsNonRoot can verify it without looking up /etc/passwd.
USER 10001:10001
WORKDIR /
EXPOSE 9100
# `mqtt-bridge health` GETs http://127.0.0.1:9100/healthz and exits 0 or 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["mqtt-bridge", "health"]
# Python is PID 1 here: the bridge installs its own SIGTERM/SIGINT handlers (graceful leave).
ENTRYPOINT ["mqtt-bridge"]
CMD ["run", "--config", "/etc/mqtt-bridge/config.yaml"]
