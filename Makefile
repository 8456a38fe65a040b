# The README's two commands: `make run` and `make test`. Both build .venv on first use.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
PYTEST_ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 8000
STORE ?= ./residuals

.PHONY: venv test run redis prometheus haproxy chromium clean

# A venv whose creation failed half-way (Debian without python3.11-venv leaves a python but
# no pip) is made again rather than reused.
$(STAMP): pyproject.toml
	@$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); } || \
	  { echo "make: could not create $(VENV) with $(PYTHON): install python3.11 and python3.11-venv (Debian/Ubuntu: apt-get install python3.11-venv)" >&2; rm -rf $(VENV); exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

# Tests talk to a real Redis on 127.0.0.1:6379 (started when it is not answering) and start
# private redis-servers of their own, so the binary is installed even when one answers.
redis:
	@scripts/ensure-redis.sh
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || scripts/start-redis.sh

# tests/ops run a real Prometheus (Debian's package) against a live server.
prometheus:
	@scripts/ensure-prometheus.sh

# tests/ops run the shipped deploy/haproxy/haproxy.cfg (Debian's package) before three servers.
haproxy:
	@scripts/ensure-haproxy.sh

# tests/integration/test_browser_ui.py drives Debian's chromium headless through chromedriver;
# its screenshots land in test-artifacts/.
chromium:
	@scripts/ensure-chromium.sh

test: venv redis prometheus haproxy chromium
	$(PY) -m pytest $(PYTEST_ARGS)

# The main job on the embedded default: serve the directory store with the tiny backbone
# (seeded random weights, no download), training two demo tasks on generated images first
# when the store is empty.
run: venv
	$(PY) -m trainer.demo --store $(STORE)
	$(VENV)/bin/uda-serve --model uda-tiny-vit --pretrained random --store $(STORE) --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
