#!/usr/bin/env bash
# One entry point for a fresh machine:
#   ./dev.sh run [run_offline.py args]   install, then run the main job (bundled tiny model by default)
#   ./dev.sh test [pytest args]          install, then run the test suite on CPU (8 virtual devices)
set -euo pipefail
cd "$(dirname "$0")"

find_python() {  # a Python >= 3.12: PATH first, then pyenv's installs
  for py in python3.13 python3.12 python3; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$py"; return
    fi
  done
  for py in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3; do
    if [ -x "$py" ]; then echo "$py"; return; fi
  done
  echo "sidp-jax needs Python >= 3.12 (none found on PATH or in pyenv)" >&2; exit 1
}

install() {  # $1: what to install (".": the run's needs only; ".[test]": the tests' too)
  if [ ! -x .venv/bin/python ]; then
    "$(find_python)" -m venv .venv
  fi
  echo "installing $1 into .venv (full log: .venv/install.log) ..." >&2
  # pip's own lines show progress (what it collects and installs), the rest goes to the log
  set +e
  { .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e "$1"; } 2>&1 \
    | tee .venv/install.log | grep --line-buffered -E "^(Collecting|Downloading|Installing|Successfully)" >&2
  local status=${PIPESTATUS[0]}
  set -e
  if [ "$status" -ne 0 ]; then
    tail -40 .venv/install.log >&2; echo "install failed" >&2; exit 1
  fi
}

cmd="${1:-}"; shift || true
case "$cmd" in
  run)  install "."; exec .venv/bin/python run_offline.py "$@" ;;
  test) install ".[test]"
        export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
        set +e; .venv/bin/python -m pytest -q "$@"; rc=$?; set -e
        if [ "$rc" -eq 5 ]; then echo "no tests were collected: failing" >&2; exit 1; fi
        exit "$rc" ;;
  *) echo "usage: ./dev.sh run [run_offline.py args] | ./dev.sh test [pytest args]" >&2; exit 2 ;;
esac
