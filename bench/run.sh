#!/usr/bin/env bash
# The benchmark in one command: installs HAProxy, nginx and wrk (Debian packages) if missing,
# then runs bench/bench.py, which prints the table and writes bench/results.md and
# bench/results.json. Arguments go to bench.py (--help lists them; --profile adds py-spy).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

missing=()
for tool in haproxy nginx wrk; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        echo "bench: missing ${missing[*]}; install them (sudo apt-get install ${missing[*]})" >&2
        exit 1
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
[ -x "$PY" ] || make venv
case " $* " in
    *" --profile "*) "$PY" -m pip install -q -r bench/requirements.txt ;;
esac
exec "$PY" bench/bench.py "$@"
