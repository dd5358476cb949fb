#!/usr/bin/env bash
# Runs the tests, setting up .venv first if needed. Extra arguments go to pytest
# (e.g. `scripts/test.sh -m "not slow"` for the fast tests only).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec python -m pytest "$@"
