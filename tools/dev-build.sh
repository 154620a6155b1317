#!/usr/bin/env bash
# Developer rebuild: editable install (Python files are used from python/ directly), compiled
# module rebuilt incrementally in build/. Serialised with a lock so parallel sessions do not clash.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/splisosm-dev-build.lock \
  python3 -m pip install -q --no-build-isolation --no-deps -e . -Cbuild-dir=build
