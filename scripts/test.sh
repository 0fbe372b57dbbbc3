#!/usr/bin/env bash
# The whole test suite: every Rust test, then the official `openai` Python client against
# `bitnet serve`. Sets up what it needs (a .venv with `openai`) on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace
cargo build -p bitnet-cli
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import openai" 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet openai
fi
.venv/bin/python tests/openai/test_openai.py
