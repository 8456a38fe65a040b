#!/usr/bin/env bash
# ensure-debian-package.sh PACKAGE TOOL...: makes every TOOL available, installing Debian's
# PACKAGE with apt-get when one is missing. The package's own service is not started (there may
# be no init system, its port may be taken, and the tests start their own servers).
set -euo pipefail
package="$1"; shift
missing() { for tool in "$@"; do command -v "$tool" >/dev/null 2>&1 || return 0; done; return 1; }
missing "$@" || exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "$* not found and no apt-get here: install $package, then rerun" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "$* not found: run 'apt-get install $package' as root, then rerun" >&2
  exit 1
fi
echo "$* not found: installing Debian's $package package with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d 101 keeps the package's post-install from starting its service.
cleanup_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  cleanup_policy=1
fi
status=0
apt-get install -y -qq --no-install-recommends "$package" >/dev/null || status=$?
if [ "$cleanup_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
if [ "$status" -ne 0 ]; then
  echo "apt-get install $package failed (exit $status)" >&2
  exit "$status"
fi
for tool in "$@"; do
  command -v "$tool" >/dev/null 2>&1 || { echo "$tool still missing after installing $package" >&2; exit 1; }
done
