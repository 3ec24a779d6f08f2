# syntax=docker/dockerfile:1
# mqtt-bridge: the wheel is built in a throwaway stage and installed into
# python:3.11-slim-bookworm. The runtime runs as uid 10001 and writes nothing to disk,
# so `--read-only` works.
#   docker build -t mqtt-bridge .
#   docker run --read-only -v $PWD/dtb.yaml:/etc/mqtt-bridge/config.yaml:ro mqtt-bridge
# `docker stop` waits 10 s by default: give it more than shutdown.deadline (`-t 30`).

# Pinned by digest: a tag moves, a digest does not. Refresh it (security updates of the
# base) with  docker buildx imagetools inspect python:3.11-slim-bookworm  and paste the
# top-level "Digest:" here (README, "Building the image").
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:b18992999dbe963a45a8a4da40ac2b1975be1a776d939d098c647482bcad5cba

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# Only what the wheel needs (README.md is the package's long description), and the lock.
COPY pyproject.toml README.md requirements.lock ./
COPY bridge ./bridge
# Every dependency exactly as locked, each file checked against its sha256
# (requirements.lock, refreshed by scripts/lock.sh), then our own wheel alone. The
# runtime stage installs from here, offline, and checks the hashes again.
RUN pip wheel --wheel-dir /wheels --require-hashes -r requirements.lock \
 && pip wheel --wheel-dir /wheels --no-deps . \
 && cp requirements.lock /wheels/

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="mqtt-bridge" \
      org.opencontainers.image.description="At-least-once MQTT republish bridge (DTB/BTD) for broker migrations" \
      org.opencontainers.image.licenses="Apache-2.0"
# PYTHONDONTWRITEBYTECODE: no __pycache__ writes at run time (pip compiled the .pyc files
# at install time, into the image). The HTTP endpoints must be reachable from outside the
# container, so the image's default for http.listen is 0.0.0.0:9100. It is a default, not
# an override (as BRIDGE_HTTP__LISTEN would be): a config file's `listen`, null included,
# still wins. Every other setting comes from the config file or BRIDGE_* variables.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MQTT_BRIDGE_DEFAULT_LISTEN=0.0.0.0:9100
# A bind mount from the builder keeps the wheels out of the image's layers.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels \
      --require-hashes -r /wheels/requirements.lock \
 && pip install --no-cache-dir --no-index --no-deps /wheels/mqtt_bridge-*.whl \
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
