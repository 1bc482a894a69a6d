"""What the build decides on, measured by compiler.tuning after tuning: records vs the default schedule.

check_static: each static task's best record and its untuned kernel are timed again side by side
(alternating, medians; task["check"]). The untuned latency in the table is one sample taken before
tuning: on a machine shared with other work it was seen 5x off (mobilemoe-s LM head: 235 ms then,
47 ms side by side, where the record takes 118 ms), and a build that trusted it got slower.

check_replays: how a shape bucket's record does on the whole dynamic kernel.

A kernel called with free dims (prefill's token count, decode's context length) is tuned at fixed
shape buckets (compiler/tuning/tasks.py), but an artifact has one copy of it for every length: the build
replays one bucket's record on the dynamic kernel (passes/apply_tuning_database.py). A record can
win at its own bucket and lose elsewhere: its inner tiles are fixed, so at a short length most of
each tile is predicated off. Measured on the bundled model: attention's score matmul tuned at 512
tokens, replayed, made a 16-token prompt take 70 ms instead of 4.5 ms (17 ms for each of 4 calls).

So after tuning, `check_replays` builds each bucket's best record replayed on its dynamic kernel
and times it at every check shape (the session's buckets plus CHECKS: a shorter prompt, a short
and a long context), next to the untuned kernel at the same shapes, both as built: with their
free dims free (a record tuned at a static shape can be much faster there than as a dynamic
kernel at the same shape), into session.json:

    session["replays"][kernel] = {"entry": "prefill",
                                  "untuned": {"tokens=8,past=0": s, ...},
                                  "records": {task hash: {"task": name, "best_s": s, "at": {label: s}, "why": ""}}}

The build replays only a record that is nowhere slower than the default schedule (by more than
measurement noise: database.REPLAY_SLACK), the one with the largest mean speedup over the check
shapes (database.TunedKernels.pick_replay).
"""
from __future__ import annotations

import statistics
import sys

import tvm
from tqdm import tqdm

from passes.apply_tuning_database import replay_record
from passes.kernel_workloads import is_buffer, specialize
from targets import get_target

from . import database as tdb
from .measure import MeasureError, measure_many
from .tasks import default_scheduled, extract_tasks, untuned_module

# check shapes besides the session's buckets: entry -> [{model dim: value}]
CHECKS = {"decode": [{"past": 16}, {"past": 512}], "prefill": [{"tokens": 8, "past": 0}]}


def label(bucket: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in bucket.items())


def check_shapes(shapes: dict) -> dict:
    """The session's buckets plus CHECKS, per entry, without repeats."""
    out = {}
    for entry in sorted(set(shapes) | set(CHECKS)):
        seen = []
        for bucket in [*shapes.get(entry, []), *CHECKS.get(entry, [])]:
            if bucket not in seen:
                seen.append(bucket)
        out[entry] = seen
    return out


def check_replays(session: dict, db_dir, mod, target, spec, builder, runner, verbose: bool = True) -> None:
    """Fill session["replays"] for every dynamic kernel with a tuned bucket (see the module doc);
    session.json is written after each kernel. Records measured before (same best) are kept."""


    tuned = [t for t in session["tasks"] if t.get("bucket") and t.get("best_s")]
    if not tuned:
        return
    at_shapes: dict[str, dict] = {}  # kernel -> {label: Task}
    for task in extract_tasks(mod, check_shapes(session["shapes"])):
        if task.bucket:
            at_shapes.setdefault(task.kernel, {})[label(task.bucket)] = task
    db = tdb.open_database(db_dir, create=False)
    work = [(k, [t for t in tuned if t["kernel"] == k]) for k in at_shapes if any(t["kernel"] == k for t in tuned)]
    bar = tqdm(total=len(work), desc="replay checks", unit="kernel", disable=not verbose)

    def seconds(jobs: list) -> list:  # [(module, task)] -> [seconds or None], one build + run batch
        out = []
        for (_, task), res in zip(jobs, measure_many(builder, runner, target, [(m, t.workload) for m, t in jobs])):
            if isinstance(res, MeasureError):
                print(f"warning: {task.name}: {res}", file=sys.stderr)
                res = None
            out.append(res)
        return out

    for kernel, records in work:
        shapes = at_shapes[kernel]
        entry = session.setdefault("replays", {}).setdefault(
            kernel, {"entry": records[0]["entry"], "untuned": {}, "records": {}})
        kernel_func = next(iter(shapes.values())).kernel_func
        todo = [lab for lab in shapes if lab not in entry["untuned"]]
        entry["untuned"].update(zip(todo, seconds([(default_scheduled(_as_built(kernel_func, shapes[lab]), target,
                                                                      spec), shapes[lab]) for lab in todo])))
        by_hash = {tdb.workload_hash(t.workload): t for t in shapes.values()}
        for rec in records:
            done = entry["records"].get(rec["hash"])
            if done and done["best_s"] == rec["best_s"] or rec["hash"] not in by_hash:
                continue
            record = db.query_tuning_record(by_hash[rec["hash"]].workload, target, "main")
            func, why = replay_record(kernel_func, record, target) if record is not None else (None, "no record")
            row = {"task": rec["name"], "best_s": rec["best_s"], "at": {}, "why": why}
            if func is not None:
                row["at"] = dict(zip(shapes, seconds([(_as_built(func, t), t) for t in shapes.values()])))
            entry["records"][rec["hash"]] = row
        tdb.write_session(db_dir, session)
        bar.update(1)
    bar.close()


def check_static(session: dict, db_dir, mod, target, builder, runner, rounds: int = 3, verbose: bool = True) -> None:
    """Time each tuned static task's best record and its untuned kernel side by side, alternating,
    `rounds` times each (medians into the task's "check": {"untuned_s", "tuned_s", "best_s"}): the
    untuned latency of the session was measured once, before tuning, and a machine shared with other
    work can make that one sample, or the record's, much off. The build compares these."""



    todo = [t for t in session["tasks"] if not t.get("bucket") and t.get("best_s")
            and t.get("check", {}).get("best_s") != t["best_s"]]
    if not todo:
        return
    spec_tasks = {tdb.workload_hash(t.workload): t for t in extract_tasks(mod, session["shapes"]) if not t.bucket}
    db = tdb.open_database(db_dir, create=False)
    spec = get_target(session["target"])
    for entry in tqdm(todo, desc="side-by-side checks", unit="task", disable=not verbose):
        task = spec_tasks.get(entry["hash"])
        sch = db.query_schedule(task.workload, target, "main") if task else None  # the best record, applied
        if sch is None:
            continue
        jobs = [(untuned_module(task, target, spec), task.workload), (sch.mod, task.workload)] * rounds
        res = measure_many(builder, runner, target, jobs)
        if any(isinstance(r, MeasureError) for r in res):
            print(f"warning: {entry['name']}: side-by-side check failed: "
                  f"{next(r for r in res if isinstance(r, MeasureError))}", file=sys.stderr)
            continue
        entry["check"] = {"untuned_s": statistics.median(res[0::2]), "tuned_s": statistics.median(res[1::2]),
                          "best_s": entry["best_s"]}
        tdb.write_session(db_dir, session)


def _as_built(func, task):
    """A dynamic kernel as a measurable module: its free buffer dims stay free (the arguments of the
    task's workload bind them at run time, so the code timed is the code built); scalar parameters
    (a context length passed by value) are bound to the task's values, since a runner passes tensors."""
    scalars = {p: task.values[p] for p in func.params if not is_buffer(p) and p in task.values}
    if scalars:
        func = specialize(func, scalars)
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def replay_table(session: dict) -> str:
    """Per dynamic kernel and tuned bucket: the replayed record's speedup over the default schedule
    at each check shape (us; "-" where it failed to build or run)."""
    rows = []
    for kernel, entry in session.get("replays", {}).items():
        labels = list(entry["untuned"])
        rows.append(f"{kernel} ({entry['entry']}): untuned us " +
                    "  ".join(f"{lab}: {_us(entry['untuned'][lab])}" for lab in labels))
        for row in entry["records"].values():
            cells = []
            for lab in labels:
                s, u = row["at"].get(lab), entry["untuned"][lab]
                cells.append(f"{lab}: {_us(s)}" + (f" ({u / s:.2f}x)" if s and u else ""))
            rows.append(f"  record of {row['task']}: " + ("  ".join(cells) if row["at"] else row["why"]))
    return "\n".join(rows)


def _us(s) -> str:
    return "-" if s is None else f"{s * 1e6:.1f}"
