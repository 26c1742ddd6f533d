#!/usr/bin/env bash
# Tests of the pure-Python client (python/) against the real daemon:
# builds sysgenidd, makes a fresh virtual environment, installs this
# package the way users do (`pip install ./python`) plus pytest from PyPI,
# and runs python/tests against the installed copy. Run as root for the
# privilege tests (they run clients and a daemon as `nobody`).
#
# Exit status: pytest's, except that "no tests collected" (5) is a failure.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

# Debian's interpreter, not one under a private home directory, so the
# tests' `nobody` processes can run the same environment.
py="${PYTHON:-}"
if [ -z "$py" ]; then
    if [ -x /usr/bin/python3 ]; then py=/usr/bin/python3; else py="$(command -v python3)"; fi
fi
if ! "$py" -c 'import ensurepip, venv' 2>/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi
"$py" -c 'import sys; assert sys.version_info >= (3, 9), sys.version'

cargo build -q -p sysgenidd --bin sysgenidd
target_dir="$(cargo metadata --format-version 1 --no-deps | "$py" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
export SYSGENIDD="$target_dir/debug/sysgenidd"

venv="$(mktemp -d /tmp/sysgenid-python-tests.XXXXXX)"
trap 'rm -rf "$venv"' EXIT
chmod 755 "$venv"
"$py" -m venv "$venv/env"
export PIP_CACHE_DIR=/var/cache/sysgenid-pip PIP_DISABLE_PIP_VERSION_CHECK=1
"$venv/env/bin/pip" install -q pytest "$repo/python"

# From / so that the installed package, not the source tree, is imported.
cd /
set +e
"$venv/env/bin/python" -m pytest -p no:cacheprovider -ra "$@" "$repo/python/tests"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "python/run-tests.sh: pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"
