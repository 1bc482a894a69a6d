"""The tuning database directory that compiler.tuning keeps and compiler.build --tuning-db applies.

    DIR/database_workload.json       MetaSchedule JSONDatabase: one workload per line
                                     [structural hash, module]
    DIR/database_tuning_record.json  one measured candidate per line, appended as it is measured:
                                     [workload line index, [trace, run seconds, target, args]]
    DIR/session.json                 what the session tuned: target, model, shape buckets, and per
                                     task its name, kernel, entry, bucket, workload hash, calls and
                                     the untuned latency (the build's own schedule, measured once);
                                     "replays": bucket records timed on their whole dynamic kernel
                                     (compiler/tuning/replay.py)

Both database files only grow by whole appended lines, so a session killed at any point (SIGKILL)
leaves at most one torn last line, which `repair` drops before anything reads the files. Trials
are counted from the record file itself (records_by_workload), so a resumed session tunes each
task only for the trials it still lacks, and MetaSchedule does not re-measure the candidates it
finds in the database. A failed candidate is stored with 1e10 s (MetaSchedule's convention); the
records of a candidate lost with its device are not stored at all (compiler.tuning), so they are
tried again.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tvm.s_tir.meta_schedule.database import JSONDatabase
from tvm.s_tir.meta_schedule.utils import shash2hex

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
SESSION = "session.json"
FAILED = 1e9  # run seconds at or above this: a failed candidate (MetaSchedule stores 1e10)
REPLAY_SLACK = (0.10, 2e-6)  # a replayed record counts as slower at a shape above untuned * 1.10 + 2 us
# the shape buckets a session tunes at (unless it records its own): entry -> list of {model dim: value}
SHAPES = {
    "decode": [{"past": 128}],
    "prefill": [{"tokens": 32, "past": 0}, {"tokens": 128, "past": 0}, {"tokens": 512, "past": 0}],
}


class TuningDBError(RuntimeError):
    """The database directory is missing, malformed, or was tuned for another target."""


def repair(db_dir) -> list[str]:
    """Drop a torn last line (a writer killed mid-append) from each database file; -> what was fixed."""
    fixed = []
    for name in (WORKLOADS, RECORDS):
        path = Path(db_dir) / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        keep = len(data)
        lines = data.split(b"\n")
        tail = lines[-1]
        if tail.strip():  # no trailing newline: the last append did not finish
            keep -= len(tail)
        else:
            tail = lines[-2] if len(lines) > 1 else b""
            try:
                json.loads(tail) if tail.strip() else None
            except ValueError:  # a whole-looking line that is not JSON
                keep -= len(tail) + 1
        if keep != len(data):
            with open(path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
            fixed.append(f"{name}: dropped a torn last line ({len(data) - keep} bytes)")
    return fixed


def open_database(db_dir, create: bool = True):
    """The MetaSchedule JSONDatabase of DIR (repaired first)."""

    db_dir = Path(db_dir)
    if create:
        db_dir.mkdir(parents=True, exist_ok=True)
    elif not (db_dir / WORKLOADS).is_file():
        raise TuningDBError(f"{db_dir}: no {WORKLOADS}; not a tuning database written by compiler.tuning")
    repair(db_dir)
    return JSONDatabase(work_dir=str(db_dir), allow_missing=create)


def workload_hash(mod) -> str:
    """The structural hash as the workload file writes it (decimal)."""
    return str(int(shash2hex(mod), 16))


def records_by_workload(db_dir) -> dict[str, list[float]]:
    """{workload hash: [mean run seconds of each record, in the order they were measured]}."""
    db_dir = Path(db_dir)
    if not (db_dir / WORKLOADS).is_file():
        return {}
    hashes = []
    with open(db_dir / WORKLOADS) as f:
        for line in f:
            if line.strip():
                hashes.append(json.loads(line)[0])
    out: dict[str, list[float]] = {h: [] for h in hashes}
    path = db_dir / RECORDS
    if path.is_file():
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                index, record = json.loads(line)
                secs = record[1] or [1e10]
                out[hashes[index]].append(sum(secs) / len(secs))
    return out


def best_so_far(seconds: list[float]) -> list[float | None]:
    """Running minimum over the successful records (None before the first success)."""
    best, out = None, []
    for s in seconds:
        if s < FAILED and (best is None or s < best):
            best = s
        out.append(best)
    return out


def read_session(db_dir) -> dict:
    path = Path(db_dir) / SESSION
    if not path.is_file():
        raise TuningDBError(f"{path}: missing; the directory was not written by compiler.tuning")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TuningDBError(f"{path}: not valid JSON ({e})") from None


def write_session(db_dir, session: dict) -> None:
    """Atomic: a temp file renamed over session.json."""
    path = Path(db_dir) / SESSION
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(session, indent=1) + "\n")
    os.replace(tmp, path)


class TunedKernels:
    """The records a build applies: for a workload, the best record of the session's task when it
    beats the untuned schedule by more than `margin` (timed side by side where compiler.tuning did:
    task["check"]; else None: the build keeps its own); for a
    dynamic kernel, the bucket record pick_replay finds nowhere slower on the whole kernel."""

    def __init__(self, db_dir, target_name: str, margin: float = 0.02):
        self.session = read_session(db_dir)
        if self.session.get("target") != target_name:
            raise TuningDBError(f"{db_dir}: tuned for target '{self.session.get('target')}', not "
                                f"'{target_name}'; tune it with compiler.tuning --target {target_name}")
        self.db_dir = str(db_dir)
        self.db = open_database(db_dir, create=False)
        self.tasks = {t["hash"]: t for t in self.session.get("tasks", [])}
        self.shapes = self.session.get("shapes", SHAPES)
        self.margin = margin

    def best(self, mod, target):
        """(TuningRecord, seconds, task dict) or None."""
        task = self.tasks.get(workload_hash(mod))
        if task is None:
            return None
        record = self.db.query_tuning_record(mod, target, "main")
        if record is None or not record.run_secs:
            return None
        secs = sum(float(s) for s in record.run_secs) / len(record.run_secs)
        untuned = task.get("untuned_s")
        check = task.get("check")
        if check and check.get("best_s") == task.get("best_s"):  # measured side by side: decides
            secs, untuned = check["tuned_s"], check["untuned_s"]
        if secs >= FAILED or (untuned is not None and secs > untuned * (1 - self.margin)):
            return None
        return record, secs, task

    def pick_replay(self, kernel: str, hits: list) -> tuple[tuple | None, str]:
        """Of a dynamic kernel's bucket hits [(record, seconds, task)], the one to replay on it: measured
        replayed at every check shape (session["replays"], compiler/tuning/replay.py), nowhere slower
        than the default schedule beyond REPLAY_SLACK, largest mean speedup. -> (hit, "") or (None, why)."""
        replays = self.session.get("replays", {}).get(kernel)
        if replays is None:
            return None, "not measured replayed on the dynamic kernel (run the compiler.tuning command again)"
        untuned = replays["untuned"]
        best, why = None, "no record was measured replayed on the dynamic kernel"
        for hit in hits:
            row = replays["records"].get(hit[2]["hash"])
            if not row or not row["at"]:
                why = row["why"] if row else why
                continue
            rel, absolute = REPLAY_SLACK
            slower = [(lab, s, untuned.get(lab)) for lab, s in row["at"].items()
                      if s is None or untuned.get(lab) is None or s > untuned[lab] * (1 + rel) + absolute]
            if slower:
                lab, s, u = slower[0]
                why = (f"record of {row['task']} replayed: {'-' if s is None else f'{s * 1e6:.1f}'} us at {lab}, "
                       f"default schedule {'-' if u is None else f'{u * 1e6:.1f}'} us")
                continue
            gain = sum(untuned[lab] / s for lab, s in row["at"].items()) / len(row["at"])
            if best is None or gain > best[0]:
                best = (gain, hit)
        return (best[1], "") if best else (None, why)
