#!/usr/bin/env bash
# The whole test suite: format, lints, unit and integration tests (the real `flare`
# binary on loopback), and the Python client written from PROTOCOL.md alone.
# Installs what it needs when missing; quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

if ! python3 -c 'import websocket, pytest' 2>/dev/null; then
    step "installing Python test deps (websocket-client, pytest)"
    python3 -m pip install --quiet --disable-pip-version-check websocket-client pytest
fi

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo test"
cargo test --workspace

step "Python protocol client against the real binary"
cargo build --quiet -p flare-gateway --bin flare
FLARE_BIN="$PWD/target/debug/flare" python3 -m pytest -q clients/python
