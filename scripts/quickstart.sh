#!/usr/bin/env bash
# Runs edgelora's main job on the default model, setting up .venv first if needed.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec edgelora quickstart "$@"
