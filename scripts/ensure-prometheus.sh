#!/usr/bin/env bash
# Makes `prometheus` and `promtool` available for tests/ops (installs Debian's package if missing).
# The package's own service is not started: the tests start their own Prometheus on loopback.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "prometheus/promtool not found and no apt-get here: install Prometheus 2.x, then rerun" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "prometheus/promtool not found: run 'apt-get install prometheus' as root, then rerun" >&2
  exit 1
fi
echo "prometheus/promtool not found: installing Debian's prometheus package with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d 101 keeps the package's post-install from starting a system Prometheus on :9090
# (there may be no init system, and the tests want no stray server).
cleanup_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  cleanup_policy=1
fi
status=0
apt-get install -y -qq --no-install-recommends prometheus >/dev/null || status=$?
if [ "$cleanup_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
if [ "$status" -ne 0 ]; then
  echo "apt-get install prometheus failed (exit $status)" >&2
  exit "$status"
fi
for tool in prometheus promtool; do
  command -v "$tool" >/dev/null 2>&1 || { echo "$tool still missing after installing prometheus" >&2; exit 1; }
done
