"""Start-up time of the CLI: ``distill --help`` (and a stage's ``--help``) against a bare Python start.

    python tools/bench_cli.py            # median of 5 runs each; prints one JSON line
    python tools/bench_cli.py --repeats 9

Each command runs as a fresh process, the way a user types it (``python -m distill.cli``: the same code as
the ``distill`` script); the baseline is ``python -c pass`` in the same loop, so the ratio says what distill
adds on top of starting Python. Goal (issue 15): ``distill --help`` under 0.5 s on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_S = 0.5


def _wall(argv: list[str], env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    py = sys.executable
    cmds = {"python": [py, "-c", "pass"], "help": [py, "-m", "distill.cli", "--help"],
            "train_student_help": [py, "-m", "distill.cli", "train-student", "--help"],
            "import_torch": [py, "-c", "import torch"]}
    _wall(cmds["help"], env)                         # warm the file cache once
    runs: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(a.repeats):                       # interleaved: load changes hit every command alike
        for k, argv in cmds.items():
            runs[k].append(_wall(argv, env))
    med = {k: statistics.median(v) for k, v in runs.items()}
    out = {"repeats": a.repeats, "help_s": round(med["help"], 3), "train_student_help_s": round(med["train_student_help"], 3),
           "python_s": round(med["python"], 3), "import_torch_s": round(med["import_torch"], 3),
           "help_over_python": round(med["help"] / med["python"], 2),
           "help_over_import_torch": round(med["help"] / med["import_torch"], 3),
           "goal_s": GOAL_S, "meets": med["help"] < GOAL_S, "load": os.getloadavg()[0]}
    print(json.dumps(out))
    return 0 if out["meets"] else 1


if __name__ == "__main__":
    sys.exit(main())
