"""Run a list of steps, each a command under its own deadline, recording each in summary.json
as it ends.  Standard library only (it runs before anything is installed).

A step is a command run in its own process group with stdout and stderr in OUT/<step>.log.  A step
still running at its deadline is killed (SIGTERM to the group, SIGKILL 5 s later) and recorded as
`timeout`; the next step runs anyway.  summary.json is rewritten (to a temporary file, then renamed)
before the first step, listing every step as `pending`, and again after each step, so a run that is
itself killed leaves the record of every step that finished.  A second run with the same OUT adds
its steps to the same summary (the GPU kit's llama.cpp command does).

A step's command may write a one-line result to OUT/<step>.detail; it becomes the step's `detail`
(else the last line of its log does).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

KILL_GRACE_S = 5.0
KILLED = "killed at its deadline"


@dataclass
class Step:
    name: str
    deadline_s: float
    argv: list[str]


@dataclass
class StepRecord:
    step: str
    command: str  # which kit command ran it ("run", "llama")
    deadline_s: float
    status: str = "pending"  # pending | ok | failed | timeout
    seconds: float = 0.0
    exit: int | None = None
    detail: str = ""


class Summary:
    """OUT/summary.json: {"steps": [StepRecord, ...]}, written whole after every change."""

    def __init__(self, path: Path):
        self.path = path
        self.steps: list[dict] = []
        if path.is_file():
            self.steps = json.loads(path.read_text()).get("steps", [])

    def add(self, records: list[StepRecord]) -> None:
        self.steps += [asdict(r) for r in records]
        self.write()

    def update(self, index: int, record: StepRecord) -> None:
        self.steps[index] = asdict(record)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"steps": self.steps}, indent=1) + "\n")
        tmp.replace(self.path)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _detail(out: Path, name: str) -> str:
    det = out / f"{name}.detail"
    if det.is_file():
        return det.read_text().strip()
    lines = [ln for ln in (out / f"{name}.log").read_text(errors="replace").splitlines()
             if ln.strip() and not ln.startswith(KILLED)]
    return lines[-1][:300] if lines else ""


def run_step(step: Step, out: Path, env: dict, cwd: Path) -> tuple[str, int | None, float]:
    """(status, exit code or None, seconds) of one step; its output goes to OUT/<step>.log."""
    (out / f"{step.name}.detail").unlink(missing_ok=True)
    t0 = time.monotonic()
    with (out / f"{step.name}.log").open("w") as log:
        try:
            proc = subprocess.Popen(step.argv, cwd=cwd, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            log.write(f"cannot start {step.argv[0]}: {exc}\n")
            return "failed", None, round(time.monotonic() - t0, 1)
        try:
            code: int | None = proc.wait(timeout=step.deadline_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            log.write(f"\n{KILLED} of {step.deadline_s:g} s\n")
            return "timeout", None, round(time.monotonic() - t0, 1)
    return ("ok" if code == 0 else "failed"), code, round(time.monotonic() - t0, 1)


def run_steps(steps: list[Step], out: Path, command: str, env: dict | None = None,
              cwd: Path | None = None) -> list[StepRecord]:
    """Every step in order, each under its deadline; summary.json kept current throughout."""
    out.mkdir(parents=True, exist_ok=True)
    summary = Summary(out / "summary.json")
    first = len(summary.steps)
    records = [StepRecord(s.name, command, s.deadline_s) for s in steps]
    summary.add(records)
    for i, (step, rec) in enumerate(zip(steps, records)):
        rec.status, rec.exit, rec.seconds = run_step(step, out, env or dict(os.environ),
                                                     cwd or Path.cwd())
        rec.detail = _detail(out, step.name)
        if rec.status == "timeout":
            rec.detail = f"killed at its {step.deadline_s:g} s deadline; last output: {rec.detail}"
        summary.update(first + i, rec)
        print(f"kit: {step.name:<11} {rec.status:<8} {rec.seconds:6.1f} s / {step.deadline_s:g} s  "
              f"{rec.detail}", flush=True)
    return records
