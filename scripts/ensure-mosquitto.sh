#!/usr/bin/env bash
# Make sure the `mosquitto` broker binary (and its C clients) exist; install them with
# apt-get when we can, otherwise say in one line exactly what to install.
set -euo pipefail
# The broker for the tests; its C clients (mosquitto_pub/sub) for the benchmark.
if { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; } \
    && command -v mosquitto_pub >/dev/null 2>&1 && command -v mosquitto_sub >/dev/null 2>&1; then
    exit 0
fi
install="apt-get install -y --no-install-recommends mosquitto mosquitto-clients"
if command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        echo "mosquitto missing: running apt-get (once)" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive $install >/dev/null
        exit 0
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        echo "mosquitto missing: running sudo apt-get (once)" >&2
        sudo -n apt-get update -qq && sudo -n env DEBIAN_FRONTEND=noninteractive $install >/dev/null
        exit 0
    fi
    echo "error: mosquitto is not installed; run: sudo $install" >&2
else
    echo "error: mosquitto is not installed; install the 'mosquitto' broker (e.g. brew install mosquitto) and put it on PATH" >&2
fi
exit 1
