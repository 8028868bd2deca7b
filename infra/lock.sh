#!/usr/bin/env bash
# Compiles the two locks, each resolved for Linux x86_64 and Python 3.11 with the sha256 of every file, installed with
# `pip install --require-hashes`:
#   infra/requirements.lock  the image's: pyproject.toml's dependencies with its `cluster` extra, infra/requirements.in
#   dev.lock                 ./dev's (tests, demo): pyproject.toml's dependencies with its `test` extra,
#                            infra/dev-requirements.in
# Run it after changing any input:
#   infra/lock.sh             (needs uv on PATH: pip install uv)
# tests/infra/test_manifests.py fails while a dependency of pyproject.toml is missing from the lock or out of range.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
uv pip compile pyproject.toml infra/requirements.in --extra cluster \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
  --custom-compile-command infra/lock.sh --output-file infra/requirements.lock
uv pip compile pyproject.toml infra/dev-requirements.in --extra test \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
  --custom-compile-command infra/lock.sh --output-file dev.lock
