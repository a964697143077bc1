"""How much disk `pip install .` takes: a throwaway venv, the project installed, MB per package.

    python scripts/install_size.py                       # the core install
    python scripts/install_size.py --extras fast,parquet # with extras
    python scripts/install_size.py --without numba,llvmlite,pyarrow --quickstart

Builds a fresh virtual environment in a temporary folder, runs ``pip install ROOT[EXTRAS]`` into it
(not editable: the installed package and its model files count), and prints the size on disk of
each installed distribution, largest first, and the total of site-packages. ``--without`` uninstalls
the named distributions afterwards (to see what an extra would save before pyproject makes it one);
``--quickstart`` then runs the README's Quick start in that environment, with no network variables
and no key, to show that what is left still works offline. ``--json`` prints the numbers as JSON.
The venv is deleted at the end (``--keep DIR`` builds it in DIR and keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000

# Run inside the new venv: the size of every installed distribution's files, and of site-packages.
_MEASURE = r"""
import json, os, sysconfig
from importlib import metadata
site = sysconfig.get_paths()["purelib"]
sizes = {}
for dist in metadata.distributions():
    total = 0
    for file in dist.files or []:
        path = file.locate()
        if os.path.isfile(path):
            total += os.path.getsize(path)
    name = dist.metadata["Name"]
    if name:
        sizes[name] = sizes.get(name, 0) + total
site_total = 0
for folder, _, files in os.walk(site):
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.islink(path):
            site_total += os.path.getsize(path)
print(json.dumps({"packages": sizes, "site_packages": site_total}))
"""


def _pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "--quiet", *args], check=True)


def _quickstart_code() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    if match is None:
        raise SystemExit("README.md has no python block under '## Quick start'")
    return match.group(1)


def _run_quickstart(python: Path, folder: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "HTTP", "HTTPS"))}
    env.pop("PYTHONPATH", None)
    env["HOME"] = str(folder)
    script = folder / "quickstart.py"
    script.write_text(_quickstart_code(), encoding="utf-8")
    done = subprocess.run(
        [str(python), str(script)], cwd=folder, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"the Quick start failed in this install:\n{done.stderr[-3000:]}")
    print(f"Quick start ran (offline, no key): {len(done.stdout.splitlines())} lines of output")


def measure(folder: Path, extras: str, without: list[str], quickstart: bool) -> dict[str, object]:
    venv.EnvBuilder(with_pip=True, clear=True).create(folder)
    python = folder / ("Scripts" if os.name == "nt" else "bin") / "python"
    target = f"{ROOT}[{extras}]" if extras else str(ROOT)
    _pip(python, "install", "--no-cache-dir", target)
    if without:
        _pip(python, "uninstall", "-y", *without)
    if quickstart:
        _run_quickstart(python, folder)
    out = subprocess.run(
        [str(python), "-c", _MEASURE], check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, object] = json.loads(out)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extras", default="", help="comma-separated extras, e.g. fast,parquet")
    parser.add_argument("--without", default="", help="distributions to uninstall afterwards")
    parser.add_argument("--quickstart", action="store_true", help="run the README Quick start")
    parser.add_argument("--top", type=int, default=15, help="packages to list (default 15)")
    parser.add_argument("--keep", type=Path, help="build the venv here and keep it")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    without = [name for name in args.without.split(",") if name]
    if args.keep is not None:
        result = measure(args.keep, args.extras, without, args.quickstart)
    else:
        with tempfile.TemporaryDirectory(prefix="nbc-install-size-") as folder:
            result = measure(Path(folder), args.extras, without, args.quickstart)
    packages: dict[str, int] = result["packages"]  # type: ignore[assignment]  # from JSON
    total = int(result["site_packages"])  # type: ignore[call-overload]  # from JSON
    if args.json:
        print(json.dumps({"extras": args.extras, "without": without, **result}))
        return 0
    label = f"[{args.extras}]" if args.extras else "(core)"
    if without:
        label += f" without {', '.join(without)}"
    print(f"pip install .{label}: {total / MB:.0f} MB in site-packages")
    for name, size in sorted(packages.items(), key=lambda item: -item[1])[: args.top]:
        print(f"  {name:<28} {size / MB:8.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
