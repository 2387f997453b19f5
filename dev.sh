#!/usr/bin/env bash
# One entry point for a fresh machine:
#   ./dev.sh run [run_offline.py args]   install, then run the main job (bundled tiny model by default)
#   ./dev.sh test [pytest args]          install, then run the test suite on CPU (8 virtual devices)
#   ./dev.sh test --latest [pytest args] the same against the newest releases in pyproject's ranges
#                                        (no lock, its own .venv-latest): the look-ahead before landing
#   ./dev.sh lock                        resolve the newest releases afresh and rewrite constraints.txt
# run and test install exactly the versions pinned in constraints.txt (every transitive
# dependency, pip and setuptools included), so a new release cannot break a fresh clone.
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

pip_logged() {  # $1: venv; the rest: pip arguments. pip's own progress lines show, the rest goes to the log
  set +e
  "$1/bin/python" -m pip "${@:2}" 2>&1 | tee -a "$1/install.log" \
    | grep --line-buffered -E "^(Collecting|Downloading|Installing|Successfully)" >&2
  local status=${PIPESTATUS[0]}
  set -e
  if [ "$status" -ne 0 ]; then
    tail -40 "$1/install.log" >&2; echo "install failed (full log: $1/install.log)" >&2; exit 1
  fi
}

install() {  # $1: what to install (".": the run's needs only; ".[test]": the tests' too); $2: venv; $3: "locked" or "latest"
  local venv="${2:-.venv}" mode="${3:-locked}"
  if [ ! -x "$venv/bin/python" ]; then
    "$(find_python)" -m venv "$venv"
  fi
  : > "$venv/install.log"
  echo "installing $1 ($mode) into $venv (full log: $venv/install.log) ..." >&2
  if [ "$mode" = locked ]; then
    # The tools first, pinned, then the project built by them (no isolated build env to float).
    pip_logged "$venv" install -c constraints.txt pip setuptools
    pip_logged "$venv" install -c constraints.txt --no-build-isolation -e "$1"
  else
    pip_logged "$venv" install --upgrade pip setuptools
    pip_logged "$venv" install --upgrade --upgrade-strategy eager --no-build-isolation -e "$1"
  fi
}

lock() {  # the newest releases pyproject's ranges admit, resolved in a fresh venv, frozen into constraints.txt
  local venv
  venv=$(mktemp -d)/venv
  install ".[test]" "$venv" latest
  {
    echo "# The tested versions: ./dev.sh run and ./dev.sh test install exactly these (pip -c)."
    echo "# Written by ./dev.sh lock on $(date -u +%Y-%m-%d) with $("$venv/bin/python" --version), $(uname -sm)."
    echo "# Refresh after ./dev.sh test --latest passes, or when pyproject's dependencies change."
    "$venv/bin/python" -m pip freeze --all --exclude-editable
  } > constraints.txt
  rm -rf "$(dirname "$venv")"
  echo "constraints.txt: $(grep -vc '^#' constraints.txt) pins ($(grep -iE '^(jax|jaxlib|flax)==' constraints.txt | tr '\n' ' '))" >&2
}

run_tests() {  # $1: venv; the rest: pytest arguments
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
  set +e; "$1/bin/python" -m pytest -q "${@:2}"; local rc=$?; set -e
  if [ "$rc" -eq 5 ]; then echo "no tests were collected: failing" >&2; exit 1; fi
  "$1/bin/python" -m pip freeze 2>/dev/null | grep -iE '^(jax|jaxlib|flax|numpy)==' | tr '\n' ' ' >&2; echo >&2
  exit "$rc"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  run)  install "."; exec .venv/bin/python run_offline.py "$@" ;;
  test) if [ "${1:-}" = --latest ]; then
          shift; install ".[test]" .venv-latest latest; run_tests .venv-latest "$@"
        else
          install ".[test]"; run_tests .venv "$@"
        fi ;;
  lock) lock ;;
  *) echo "usage: ./dev.sh run [run_offline.py args] | ./dev.sh test [--latest] [pytest args] | ./dev.sh lock" >&2; exit 2 ;;
esac
