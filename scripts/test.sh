#!/usr/bin/env bash
# Installs everything the tests need into .venv and runs the whole suite:
# ruff (lint + format check), mypy (strict on gateway/), pytest. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v openssl >/dev/null || { apt-get update -qq && apt-get install -y -qq openssl; }
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/pytest "$@"
