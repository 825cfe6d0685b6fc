#!/usr/bin/env bash
# mypy --strict over the medkms namespace. The top-level folders are mapped into
# medkms.* by pyproject's package-dir, which mypy cannot follow through an
# editable install, so this builds the same tree out of symlinks and checks it.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/medkms"
for pair in core:core proto:proto node:kms_node coordinator:coordinator \
            clients:clients contracts:contracts deploy:deploy; do
  ln -s "$repo/${pair#*:}" "$root/medkms/${pair%%:*}"
done
cd "$root"
"$repo/.venv/bin/mypy" --config-file "$repo/pyproject.toml" -p medkms
