#!/usr/bin/env bash
# Makes `redis-server` and `redis-cli` available (installs Debian's package if missing). Not
# only for start-redis.sh: tests/ops and tests/integration start private redis-servers, so the
# binary is needed even when some Redis already answers on 127.0.0.1:6379.
exec "$(dirname "$0")/ensure-debian-package.sh" redis-server redis-server redis-cli
