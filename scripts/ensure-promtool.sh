#!/usr/bin/env bash
# Make sure `promtool` exists (Debian's `prometheus` package ships it): `make test` runs
# `promtool check rules` and `promtool test rules` on deploy/prometheus/. Install it with
# apt-get when we can, otherwise say in one line exactly what to install.
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
    exit 0
fi
install="apt-get install -y --no-install-recommends prometheus"
if command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        echo "promtool missing: running apt-get (once)" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive $install >/dev/null
        # The package also starts a Prometheus server; the tests need only promtool.
        { systemctl disable --now prometheus || service prometheus stop; } >/dev/null 2>&1 || true
        exit 0
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        echo "promtool missing: running sudo apt-get (once)" >&2
        sudo -n apt-get update -qq && sudo -n env DEBIAN_FRONTEND=noninteractive $install >/dev/null
        { sudo -n systemctl disable --now prometheus || sudo -n service prometheus stop; } >/dev/null 2>&1 || true
        exit 0
    fi
    echo "error: promtool is not installed; run: sudo $install" >&2
else
    echo "error: promtool is not installed; install Prometheus (it ships promtool, e.g. brew install prometheus) and put it on PATH" >&2
fi
exit 1
