#!/usr/bin/env bash
# The BigQuery emulator the contract suite runs against: local-bigquery 0.3.2 in its own
# Python 3.13 venv (.venv-bq), with the DuckDB 1.5.5 extensions it needs installed from PyPI
# wheels into a repo-local HOME (.bq-home), because DuckDB would otherwise download them at start
# (impossible offline). Idempotent: a stamp file records what was installed; rerunning is ~instant.
set -euo pipefail
cd "$(dirname "$0")/../../.."

VENV=.venv-bq
BQ_HOME=.bq-home
PKGS=(
  "local-bigquery==0.3.2" "duckdb==1.5.5" "duckdb-extension-ducklake==1.5.5"
  "duckdb-extension-icu==1.5.5" "duckdb-extension-spatial==1.5.5" "duckdb-extension-avro==1.5.5"
)
STAMP_TEXT="recipe=1 ${PKGS[*]}"
STAMP="$VENV/.opsloop-stamp"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_TEXT" ] && [ -x "$VENV/bin/local-bigquery" ] \
  && [ -d "$BQ_HOME/.duckdb/extensions" ]; then
  exit 0
fi

echo "bq-emulator: setting up $VENV (local-bigquery 0.3.2, Python 3.13)" >&2
PY313=""
for cand in "${PYENV_ROOT:-$HOME/.pyenv}/versions/3.13.0/bin/python3.13" /root/.pyenv/versions/3.13.0/bin/python3.13 \
  "$(command -v python3.13 || true)"; do
  if [ -n "$cand" ] && [ -x "$cand" ]; then PY313="$cand"; break; fi
done

UV=$(command -v uv || true)
if [ -n "$UV" ]; then
  rm -rf "$VENV"
  if [ -n "$PY313" ]; then "$UV" venv --quiet --python "$PY313" "$VENV"; else "$UV" venv --quiet --python 3.13 "$VENV"; fi
  "$UV" pip install --quiet --python "$VENV/bin/python" "${PKGS[@]}"
else
  if [ -z "$PY313" ]; then
    echo "bq-emulator: need Python 3.13 (pyenv 3.13.0 or uv) to run local-bigquery" >&2
    exit 1
  fi
  rm -rf "$VENV"
  "$PY313" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet "${PKGS[@]}"
fi

mkdir -p "$BQ_HOME"
HOME="$PWD/$BQ_HOME" "$VENV/bin/python" - <<'PY'
import importlib
import pathlib

import duckdb

con = duckdb.connect()
for name in ("ducklake", "icu", "spatial", "avro"):
    mod = importlib.import_module(f"duckdb_extension_{name}")
    path = pathlib.Path(mod.__file__).parent / "extensions" / "v1.5.5" / f"{name}.duckdb_extension"
    con.execute(f"INSTALL '{path}'")
print("bq-emulator: DuckDB extensions installed under", pathlib.Path.home() / ".duckdb")
PY
echo "$STAMP_TEXT" > "$STAMP"
