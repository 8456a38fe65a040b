#!/usr/bin/env bash
# Makes `haproxy` available (installs Debian's package if missing) for tests/ops, which run the
# shipped deploy/haproxy/haproxy.cfg in front of real uda-serve processes on loopback.
exec "$(dirname "$0")/ensure-debian-package.sh" haproxy haproxy
