#!/usr/bin/env bash
# Compiles infra/requirements.lock: pyproject.toml's dependencies with its `cluster` extra, plus infra/requirements.in,
# resolved for the image (Linux x86_64, the base image's Python 3.11) with the sha256 of every file, so that the
# Dockerfile installs exactly these with `pip install --require-hashes`. Run it after changing either input:
#   infra/lock.sh             (needs uv on PATH: pip install uv)
# tests/infra/test_manifests.py fails while a dependency of pyproject.toml is missing from the lock or out of range.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
uv pip compile pyproject.toml infra/requirements.in --extra cluster \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
  --custom-compile-command infra/lock.sh --output-file infra/requirements.lock
