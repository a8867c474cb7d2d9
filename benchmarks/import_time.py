"""Import time of the package, against an earlier commit, measured side by side.

    python benchmarks/import_time.py --against 5f4abed    # writes benchmarks/results/import_time.{json,md}

Each run is a fresh interpreter, the two trees interleaved (median of `--repeats`): `import mmdit_probe` alone
(the package is lazy: the CLI's `--help` needs no torch), then `import mmdit_probe` plus the first touch of
`mmdit_probe.load`, which brings in torch, diffusers and nnsight. The other commit is checked out into a temporary
git worktree, removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
MODES = {"import mmdit_probe": "pass", "import mmdit_probe; mmdit_probe.load": "mmdit_probe.load"}


def seconds(tree: Path, statement: str) -> float:
    code = f"import time; t = time.perf_counter(); import mmdit_probe; {statement}; print(time.perf_counter() - t)"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return float(subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True,
                                check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the commit to compare with (e.g. the one before a change)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "other"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(other), args.against], cwd=ROOT, check=True)
        try:
            trees = {args.against: other, f"{head} (HEAD)": ROOT}
            times = {(mode, name): [] for mode in MODES for name in trees}
            for _ in range(args.repeats):
                for mode, name in times:
                    times[mode, name].append(seconds(trees[name], MODES[mode]))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, check=True)
    rows = [{"mode": mode, "tree": name, "median_s": statistics.median(t), "min_s": min(t), "runs": len(t)}
            for (mode, name), t in times.items()]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "import_time.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    lines = [f"Import time ({machine}; fresh interpreters, interleaved, median of {args.repeats})", "",
             "| statement | tree | median s | min s |", "|---|---|---|---|"]
    lines += [f"| `{r['mode']}` | {r['tree']} | {r['median_s']:.3f} | {r['min_s']:.3f} |" for r in rows]
    (RESULTS / "import_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
