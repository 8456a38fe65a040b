#!/usr/bin/env bash
# Makes `chromium` and `chromedriver` available for the browser test of /ui and /docs
# (tests/integration/test_browser_ui.py), installing Debian's packages when missing.
set -euo pipefail
here="$(dirname "$0")"
"$here/ensure-debian-package.sh" chromium chromium
"$here/ensure-debian-package.sh" chromium-driver chromedriver
