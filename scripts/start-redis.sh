#!/usr/bin/env bash
# Starts a throw-away Redis on 127.0.0.1:6379 for the test suite (installs it on Debian if missing).
set -euo pipefail
"$(dirname "$0")/ensure-redis.sh"
mkdir -p /tmp/vlp-uda-redis
redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
  --dir /tmp/vlp-uda-redis --logfile /tmp/vlp-uda-redis/redis.log
for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && exit 0; sleep 0.1; done
echo "redis-server did not answer on 127.0.0.1:6379; see /tmp/vlp-uda-redis/redis.log" >&2
exit 1
