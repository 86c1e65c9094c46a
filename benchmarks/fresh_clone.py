"""The README's quick start, checked from a fresh clone and recorded:
`python benchmarks/fresh_clone.py --dest ../fresh_check`.

Clones this repository's HEAD commit into --dest (committed work only: uncommitted changes stay behind), then
runs there, each step timed:
  setup  bash scripts/setup.sh                             creates .venv, installs the pack and its test extra
  tests  HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q    output in <dest>/pytest.log
  demo   bash scripts/demo.sh                              output in <dest>/demo.log; prints out/demo/grid.png
The CPU count and the 1-minute load average at the start and the end tell whether the cores were idle.
Writes fresh_clone.json and .md to this repository's benchmarks/results (not the clone's; --results elsewhere).
Exits non-zero if a step fails.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from r0_core.tiny.protocol import write_results  # noqa: E402


def run(cmd, cwd, log=None, env=None) -> dict:
    """Run a command (output to `log` if given), timed; never raises on failure."""
    started = time.perf_counter()
    if log is None:
        proc = subprocess.run(cmd, cwd=cwd, env=env, check=False)
    else:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=cwd, env=env, check=False, stdout=f, stderr=subprocess.STDOUT)
    return {"command": " ".join(cmd), "returncode": proc.returncode,
            "seconds": round(time.perf_counter() - started, 1), "ok": proc.returncode == 0}


def pytest_summary(text: str) -> dict:
    """Counts from pytest's last summary line, e.g. '1 failed, 290 passed, 2 skipped in 485.12s (0:08:05)'."""
    lines = [line for line in text.splitlines() if re.search(r"\b\d+ (passed|failed|error)", line)]
    if not lines:
        return {"summary": None}
    line = lines[-1].strip("= ")
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", line)}
    took = re.search(r" in ([\d.]+)s", line)
    return {"summary": line, "passed": counts.get("passed", 0), "failed": counts.get("failed", 0),
            "skipped": counts.get("skipped", 0), "errors": counts.get("errors", counts.get("error", 0)),
            "pytest_seconds": float(took.group(1)) if took else None}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", required=True, help="folder to clone into (must be missing or empty)")
    parser.add_argument("--reuse", action="store_true", help="use --dest even if it holds an earlier clone")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args(argv)
    dest = os.path.abspath(args.dest)
    reused = os.path.isdir(dest) and bool(os.listdir(dest))
    if reused and not args.reuse:
        parser.error(f"{dest} exists and is not empty; pass --reuse to use it anyway")

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, check=False).stdout.strip())
    report = {"commit": commit, "source": ROOT, "dest": dest, "reused": reused,
              "source_had_uncommitted_changes": dirty, "cpu_count": os.cpu_count(),
              "load_1min_start": os.getloadavg()[0], "steps": {}}
    steps = report["steps"]
    print(f"checking {commit[:12]} in {dest} ({os.cpu_count()} CPUs, load {report['load_1min_start']:.2f})", flush=True)

    # the clone's steps see none of this repository's environment (its .venv on PATH, PYTHONPATH)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not os.path.abspath(p).startswith(os.path.join(ROOT, "")))
    # clone (or, with --reuse, bring an earlier clone to this commit), then check out exactly HEAD's commit
    if reused:
        clone = run(["git", "fetch", "-q", ROOT, commit], cwd=dest, env=env)
    else:
        clone = run(["git", "clone", "-q", ROOT, dest], cwd=ROOT, env=env)
    if clone["ok"]:
        checkout = run(["git", "checkout", "-q", "--detach", commit], cwd=dest, env=env)
        clone = {**checkout, "command": f"{clone['command']} && {checkout['command']}",
                 "seconds": round(clone["seconds"] + checkout["seconds"], 1)}
    steps["clone"] = clone
    if clone["ok"]:
        steps["setup"] = run(["bash", "scripts/setup.sh"], cwd=dest, env=env)
    ready = clone["ok"] and steps["setup"]["ok"]

    if ready and not args.skip_tests:
        log = os.path.join(dest, "pytest.log")
        steps["tests"] = run([".venv/bin/python", "-m", "pytest", "-q"], cwd=dest, log=log,
                             env={**env, "HF_HUB_OFFLINE": "1"})
        with open(log) as f:
            steps["tests"].update(pytest_summary(f.read()), log=log)
    if ready and not args.skip_demo:
        log = os.path.join(dest, "demo.log")
        steps["demo"] = run(["bash", "scripts/demo.sh"], cwd=dest, log=log, env=env)
        with open(log) as f:
            printed = "out/demo/grid.png" in f.read()
        steps["demo"].update(printed_grid=printed, grid_exists=os.path.isfile(os.path.join(dest, "out/demo/grid.png")),
                             log=log)
        steps["demo"]["ok"] = steps["demo"]["ok"] and printed
    report["load_1min_end"] = os.getloadavg()[0]
    report["ok"] = ready and all(s["ok"] for s in steps.values())

    # the record, in the original repository
    def outcome(name):
        s = steps.get(name)
        if s is None:
            skipped = (name == "tests" and args.skip_tests) or (name == "demo" and args.skip_demo)
            return None, "skipped" if ready and skipped else "not run (an earlier step failed)"
        text = "ok" if s["ok"] else f"failed (exit {s['returncode']})"
        if name == "tests" and s.get("summary"):
            text += f": {s['summary']}"
        if name == "demo":
            text += ", printed out/demo/grid.png" if s["printed_grid"] else ", did not print out/demo/grid.png"
        if name == "clone" and reused:
            text += " (reused an earlier clone: not a fresh setup)"
        return s["seconds"], text
    rows = ["| step | seconds | outcome |", "|---|---|---|"]
    for name in ("clone", "setup", "tests", "demo"):
        seconds, text = outcome(name)
        rows.append(f"| {name} | {'' if seconds is None else f'{seconds:.1f}'} | {text} |")
    markdown = "\n".join([
        f"The README's quick start from a {'reused' if reused else 'fresh'} clone of commit `{commit[:12]}`"
        + (" (the source tree had uncommitted changes, which the clone does not carry)" if dirty else "")
        + ": `bash scripts/setup.sh`, `HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q`, `bash scripts/demo.sh`.",
        "", *rows, "",
        f"The machine has {report['cpu_count']} CPUs; the 1-minute load average was {report['load_1min_start']:.2f} "
        f"at the start (other work only: near 0 means idle cores) and {report['load_1min_end']:.2f} at the end "
        f"(this check's own last step included)."])
    # results files name no machine's paths: the repository is ".", the clone is relative to it
    dest = os.path.abspath(args.dest)
    relative = lambda text: text.replace(dest, os.path.relpath(dest, ROOT)).replace(ROOT, ".")  # noqa: E731
    report = json.loads(relative(json.dumps(report)))
    command = [relative(os.path.abspath(a)) if os.path.exists(a) else a for a in sys.argv]
    paths = write_results("fresh_clone", report, relative(markdown), args.results, argv=command)
    print(markdown + f"\nwrote {', '.join(paths)}")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
