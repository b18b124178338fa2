#!/usr/bin/env bash
# Installs everything the tests need into .venv and runs the whole suite:
# ruff (lint + format check), mypy (strict on gateway/), pytest. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v openssl >/dev/null || { apt-get update -qq && apt-get install -y -qq openssl; }
# The reverse-proxy and cluster integration tests run the real haproxy, nginx and
# redis-server (as child processes with their own configs, on ports they pick). Installing
# them must not start the system services: a policy-rc.d that answers 101 forbids every
# start by the packages' scripts (removed after).
export PATH="$PATH:/usr/sbin:/sbin"
if ! command -v haproxy >/dev/null || ! command -v nginx >/dev/null \
    || ! command -v redis-server >/dev/null; then
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy nginx redis-server
    if [ -n "$policy" ]; then rm -f "$policy"; trap - EXIT; fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
# Two workers, each taking whole test files (their module fixtures stay together).
.venv/bin/pytest -n 2 --dist loadfile "$@"
