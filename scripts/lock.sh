#!/usr/bin/env bash
# Refresh requirements.lock: the runtime dependencies of pyproject.toml, pinned with the
# sha256 of every file PyPI has for each pinned version. The image installs from it with
# `pip install --require-hashes`. Run it with the image's Python (3.11) after changing a
# dependency in pyproject.toml, and commit the result:  scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
# Only PyPI: no local indexes, wheel caches or constraints from this machine's pip config.
export PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_CONSTRAINT=
"$PYTHON" -m venv "$tools"
"$tools/bin/pip" install --quiet --index-url https://pypi.org/simple pip-tools
CUSTOM_COMPILE_COMMAND="scripts/lock.sh" "$tools/bin/pip-compile" --quiet \
    --index-url https://pypi.org/simple --no-emit-index-url \
    --generate-hashes --strip-extras --no-header --upgrade \
    --output-file requirements.lock pyproject.toml
sed -i '1i # The image installs exactly these (pip install --require-hashes); refresh: scripts/lock.sh' \
    requirements.lock
