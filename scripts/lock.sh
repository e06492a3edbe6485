#!/usr/bin/env bash
# Refresh constraints.txt: resolve pyproject.toml's ranges anew in a clean virtualenv and pin what
# pip chose. Then run `bash scripts/test.sh` (it reinstalls from the new pins) and commit both.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
"${PYTHON:-python3}" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
"$work/venv/bin/python" -m pip install -q "$ROOT[dev,models,openvino]"
{
  grep '^#' "$ROOT/constraints.txt"
  "$work/venv/bin/python" -m pip freeze --exclude-editable | grep -v -i '^edge-agent'
} >"$work/constraints.txt"
mv "$work/constraints.txt" "$ROOT/constraints.txt"
echo "constraints.txt refreshed: git diff constraints.txt" >&2
