"""Start-up time of the sgdwalk command line: `--help`, `--version`, `analyze --help`, and what each imports.

Each command runs in a fresh interpreter (the way a shell runs it) ``--repeat`` times; the table gives the median
and the fastest wall time, and whether torch was imported. ``python -X importtime`` then names the slowest
imports of ``sgdwalk --help``. Run from the repository root::

    python benchmarks/bench_cli_help.py [--repeat 7]

The target (issue 11): ``sgdwalk --help`` and ``--version`` under 0.5 s, with no torch import.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the console script's entry point, in a source checkout (cli/) or an installed package (trajectory.cli)
PROG = ("import sys\ntry:\n    from trajectory.cli.main import main\nexcept ImportError:\n    from cli.main import main\n"
        "try:\n    main(sys.argv[1:], prog_name='sgdwalk')\nexcept SystemExit:\n    pass\n"
        "print('TORCH', 'torch' in sys.modules, file=sys.stderr)\n")

COMMANDS = {"sgdwalk --help": ["--help"], "sgdwalk --version": ["--version"], "sgdwalk analyze --help": ["analyze", "--help"]}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}


def run(args: list[str], repeat: int) -> tuple[list[float], bool]:
    times, torch_loaded = [], False
    for _ in range(repeat):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", PROG, *args], capture_output=True, text=True, cwd=ROOT, env=_env())
        times.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise SystemExit(f"{args} failed: {done.stderr.strip()}")
        torch_loaded = "TORCH True" in done.stderr
    return times, torch_loaded


def slowest_imports(args: list[str], top: int) -> list[tuple[float, str]]:
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", PROG, *args], capture_output=True, text=True,
                          cwd=ROOT, env=_env())
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = [p.strip() for p in line[len("import time:"):].split("|")]
        try:
            rows.append((int(parts[1]) / 1e6, parts[2]))
        except (ValueError, IndexError):
            continue  # the header line
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--top", type=int, default=8, help="slowest cumulative imports of `sgdwalk --help` to list")
    a = ap.parse_args()
    bare = run([], 1)  # warm the file cache once
    del bare
    t_py = statistics.median(
        [(lambda t0: (subprocess.run([sys.executable, "-c", "pass"], env=_env()), time.perf_counter() - t0)[1])(time.perf_counter())
         for _ in range(a.repeat)])
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; {a.repeat} runs per command, fresh interpreter each")
    print(f"{'command':<26} {'median s':>9} {'min s':>7} {'torch':>6}")
    print(f"{'python -c pass':<26} {t_py:>9.3f} {'':>7} {'':>6}")
    for name, args in COMMANDS.items():
        times, torch_loaded = run(args, a.repeat)
        print(f"{name:<26} {statistics.median(times):>9.3f} {min(times):>7.3f} {'yes' if torch_loaded else 'no':>6}")
    print(f"\nslowest imports of `sgdwalk --help` (cumulative, s):")
    for secs, mod in slowest_imports(["--help"], a.top):
        print(f"  {secs:7.3f}  {mod}")


if __name__ == "__main__":
    main()
