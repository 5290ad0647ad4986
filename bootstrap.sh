#!/usr/bin/env bash
# Set up the environment (once; later calls reuse it) and run the default study or the tests.
#   bash bootstrap.sh study [snakemake args...]   # default study: snakemake --cores 2
#   bash bootstrap.sh test  [pytest args...]      # the test suite
#   bash bootstrap.sh setup                       # only set up the environment
# MOETUNER_VENV picks the virtual environment (default .venv); MOETUNER_PYTHON the interpreter.
set -euo pipefail
cd "$(dirname "$0")"
venv="${MOETUNER_VENV:-.venv}"
python="${MOETUNER_PYTHON:-$(command -v python3.11 || command -v python3)}"
stamp="$venv/.moetuner-installed"

if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[bootstrap] installing into $venv (about 2 GB, a few minutes the first time)"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
  "$venv/bin/python" -m pip install -q "$(grep '^torch==' requirements.txt)"
  "$venv/bin/python" -m pip install -q -r requirements.txt
  "$venv/bin/python" -m pip install -q --no-deps -e .
  touch "$stamp"
fi
export PATH="$PWD/$venv/bin:$PATH"

cmd="${1:-}"; shift || true
case "$cmd" in
  setup) echo "[bootstrap] ready: $venv" ;;
  study) exec snakemake --cores "${MOETUNER_CORES:-2}" "$@" ;;
  test)
    # SGLang's wheel alone (--no-deps: 39 MB, once) for tests/test_engine_conformance.py, which runs its
    # EPLB and its --init-expert-location loader; MOETUNER_REQUIRE_SGLANG=1: fail, not skip, without it.
    sglang_stamp="$venv/.sglang-0.5.23-installed"
    if [ ! -f "$sglang_stamp" ]; then
      echo "[bootstrap] installing sglang==0.5.23 without dependencies (test only)"
      python -m pip install -q --no-deps "sglang==0.5.23"
      touch "$sglang_stamp"
    fi
    MOETUNER_REQUIRE_SGLANG=1 exec python -m pytest "$@" ;;
  *) echo "usage: bash bootstrap.sh study|test|setup [args...]" >&2; exit 2 ;;
esac
