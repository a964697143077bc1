#!/usr/bin/env bash
# Check the Binder set-up as mybinder.org (repo2docker) would use it: a fresh virtual environment built
# only from binder/ (requirements.txt, then postBuild run in a clean copy of the committed tree), then
# every notebook executed in it, offline, on the embedded model.
#   scripts/check_binder.sh [python3]        (needs the package index for the pip installs)
set -euo pipefail
cd "$(dirname "$0")/.."
python="${1:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git archive HEAD | tar -x -C "$work" --one-top-level=repo
"$python" -m venv "$work/venv"
export PATH="$work/venv/bin:$PATH" PIP_DISABLE_PIP_VERSION_CHECK=1
unset PYTHONPATH OPENAI_BASE_URL
# A key in the environment must not pull the notebooks off the embedded model (Client(embedded=True)).
export OPENAI_API_KEY=sk-binder-check-not-a-real-key
pip install -q -r "$work/repo/binder/requirements.txt"
(cd "$work/repo" && bash binder/postBuild >/dev/null)
cd "$work/repo/notebooks"
python - <<'PY'
import pathlib, sys, time
import nbformat
from nbclient import NotebookClient

import nbcompletions
assert "site-packages" in nbcompletions.__file__, nbcompletions.__file__  # installed, not the tree
for path in sorted(pathlib.Path(".").glob("*.ipynb")):
    started = time.perf_counter()
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, kernel_name="python3", timeout=600).execute()
    print(f"{path.name}: ran in {time.perf_counter() - started:.1f} s", flush=True)
print("binder check passed", file=sys.stderr)
PY
