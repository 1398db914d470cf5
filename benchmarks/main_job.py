"""Wall time of the README's main job, `nanodiff generate "a red circle above a blue square" -o out.png`, one
fresh process per run, as a new user runs it; and, inside a process, the built-in model's load + first image.

`--against SRC` alternates each run with the same job on another source tree (PYTHONPATH=SRC, e.g. a
`git worktree` of an older commit; ABBA order), so a change is timed against its baseline in the same minutes:
this machine's speed drifts by 1.3-2x within a day, so only alternating pairs compare.

    python benchmarks/main_job.py --runs 6
    python benchmarks/main_job.py --runs 6 --against /work/old/src
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a red circle above a blue square"
NANODIFF = Path(sys.executable).with_name("nanodiff")
LOAD_AND_FIRST = f"""
import time
t = time.perf_counter()
from nanodiffusion.pipeline import Pipeline
pipe = Pipeline.load("builtin")
pipe({PROMPT!r}, seed=0)
print(time.perf_counter() - t)
"""


def environment(source: str | None) -> dict[str, str]:
    """This process's environment, with `source` (a tree's src folder) first on the import path."""
    env = dict(os.environ)
    if source:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
    return env


def main_job_seconds(source: str | None, out: Path) -> float:
    """Wall seconds of one `nanodiff generate` process (import, load, 20 steps, PNG)."""
    start = time.perf_counter()
    subprocess.run([str(NANODIFF), "generate", PROMPT, "-o", str(out)], env=environment(source), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def load_and_first_seconds(source: str | None) -> float:
    """Seconds from before the import of the pipeline to the first image, timed inside a fresh process."""
    result = subprocess.run([sys.executable, "-c", LOAD_AND_FIRST], env=environment(source), check=True,
                            capture_output=True, text=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="processes per side and measurement")
    parser.add_argument("--against", help="another tree's src folder, timed alternately as the baseline")
    args = parser.parse_args()
    sides = {"this tree": None, **({"baseline": args.against} if args.against else {})}
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for run in range(args.runs):
            for name, source in list(sides.items())[::1 if run % 2 == 0 else -1]:   # ABBA: neither side always first
                times.setdefault((name, "main job wall"), []).append(main_job_seconds(source, Path(folder) / "o.png"))
                times.setdefault((name, "import + load + first image"), []).append(load_and_first_seconds(source))
    print("| side | measure | median s | min s | max s | runs |\n|---|---|---:|---:|---:|---:|")
    for (name, measure), values in times.items():
        print(f"| {name} | {measure} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} "
              f"| {len(values)} |")


if __name__ == "__main__":
    main()
