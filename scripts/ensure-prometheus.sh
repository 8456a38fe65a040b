#!/usr/bin/env bash
# Makes `prometheus` and `promtool` available for tests/ops (installs Debian's package if missing).
# The tests start their own Prometheus on loopback.
exec "$(dirname "$0")/ensure-debian-package.sh" prometheus prometheus promtool
