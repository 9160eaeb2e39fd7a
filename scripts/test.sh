#!/usr/bin/env bash
# Installs everything the tests need, then runs the whole suite (fast and end-to-end tests).
# Usage: bash scripts/test.sh [pytest args]    (fast suite only: bash scripts/test.sh -m "not e2e")
set -euo pipefail
cd "$(dirname "$0")/.."

debian_packages=(prometheus wrk chromium chromium-driver postgresql)
missing=()
for pkg in "${debian_packages[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})) && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  # Never let a package's service start: tests run their own copies on loopback ports, stopped
  # by PID (tests/prometheus.py). The packages' maintainer scripts start services only through
  # invoke-rc.d / deb-systemd-invoke, which both obey policy-rc.d, so nothing else needs
  # stopping (and no other Prometheus on the machine is touched). The machine's own policy, if
  # any, is put back afterwards.
  policy=/usr/sbin/policy-rc.d
  saved=$(mktemp)
  if [ -e "$policy" ]; then cp -p "$policy" "$saved"; else rm -f "$saved"; fi
  restore_policy() { if [ -e "$saved" ]; then mv "$saved" "$policy"; else rm -f "$policy"; fi; }
  trap restore_policy EXIT
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
  restore_policy
  trap - EXIT
fi

python -m pip install -q -e '.[test]'
if [ -f tests/node/package.json ] && command -v npm >/dev/null; then
  (cd tests/node && npm install --silent --no-audit --no-fund)
fi

ruff check .
mypy adserver cm_models
status=0
python -m pytest "$@" || status=$?
if [ "$status" = 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$status"
