"""`python -m compiler.tuning`: tune a model's kernels with MetaSchedule; the database lives in --db.

    python -m compiler.tuning --target T --trials N --db DIR
        [--checkpoint DIR | --preset NAME]       default: the bundled model
        [--rpc-tracker HOST:PORT --rpc-key KEY]  measure on a device registered with a TVM tracker
        [--tasks REGEX] [--max-tasks K]          which kernels (default: all tunable ones)
        [--per-iter M]                           candidates measured per search round (default 16)
        [--population P]                         evolutionary search population (default 256)
        [--plot PNG]                             default DIR/tuning.png

Tasks are the model's distinct kernels at fixed shapes (compiler/tuning/tasks.py): decode's kernels at
one token, prefill's over token-count buckets, attention over a context length. Each is tuned to N
trials in turn, with a progress bar; the untuned latency (the build's own schedule) is measured
once first. Candidates are built here with the target's toolchain (compiler/tuning/measure.py) and timed
on this machine or, with --rpc-tracker, on the device. Then a table (untuned vs tuned latency,
trials, minutes per task) and a PNG of best latency vs trials. `compiler.build --tuning-db DIR`
applies the records (passes/apply_tuning_database.py).

Resuming: every measured candidate is appended to DIR at once (compiler/tuning/database.py). Run the
same command again after an interruption (even SIGKILL): finished tasks are skipped, the others
get only the trials they lack, and candidates in the database are not measured again.
A kernel with free dims is tuned per bucket; each bucket's best record is then replayed on the
whole kernel and timed at every check shape (compiler/tuning/replay.py), so the build applies it
only where it is nowhere slower than the default schedule. A device
that drops (RPC server gone) mid-session: the candidates lost with it are not stored, the session
waits up to --device-wait seconds for it to register again and goes on, measuring lost candidates
in a further search round; a device that does not come back ends the session with an error, and
what was measured is kept. Candidates that fail to build or run are stored as failed trials.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.database import TuningRecord
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

from mobilemoe.checkpoint import CheckpointError, load_checkpoint, shape_only_model
from mobilemoe.generate import DEFAULT_MODEL_DIR
from passes.kernel_workloads import without_tensor_intrinsics
from targets import TARGETS, TargetError, get_target
from targets.rpc_device import DeviceError, parse_tracker, registered_servers

from . import database as tdb
from .measure import MeasureError, is_lost, make_builder, make_runner, measure
from .replay import check_replays, check_static, replay_table
from .tasks import SHAPES, extract_tasks, lowered_for_tuning, untuned_module

FORMAT = "mobilemoe-tuning/1"
MAX_ROUNDS = 5  # search rounds per task: one, plus one more for each round that lost candidates


class TuneError(RuntimeError):
    pass


def _recorder(db, workload, target, bar, rpc, device_wait: float, counts: dict):
    """A measure callback: store each result (not those lost with the device), advance the bar,
    and end the session when the device is gone for good (counts["dropped"]: the DeviceError).
    counts["lost"] adds up the lost ones.
    A candidate that failed to build or run is stored as failed (1e10 s): it counts as a trial."""
    @derived_object
    class Recorder(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, candidates, builder_results, runner_results):
            wl = db.commit_workload(workload)
            lost = 0
            for cand, built, res in zip(candidates, builder_results, runner_results):
                if is_lost(res.error_msg):
                    lost += 1
                    continue
                secs = res.run_secs if res.run_secs else [1e10]
                if not res.run_secs:  # the candidate's own failure (a schedule that fails to build or run)
                    why = failure_line(built.error_msg, res.error_msg)
                    counts.setdefault("failed", []).append(why)
                    tqdm.write(f"warning: a candidate failed and counts as a trial: {why}", file=sys.stderr)
                db.commit_tuning_record(TuningRecord(cand.sch.trace, wl, secs, target, cand.args_info))
                bar.update(1)
            if lost:
                counts["lost"] = counts.get("lost", 0) + lost
                tqdm.write(f"warning: {lost} of {len(candidates)} candidates lost with the device (not stored; "
                           f"they are measured again)", file=sys.stderr)
            if lost and lost == len(candidates):
                try:
                    _wait_for_device(rpc, device_wait, lost)
                except DeviceError as err:  # crosses TVM's FFI as a plain error: tune() re-raises this
                    counts["dropped"] = err
                    raise

    return Recorder()


def failure_line(build_error: str | None, run_error: str | None) -> str:
    """The telling line of a failed candidate's error: build errors first (a failed build has no run)."""
    for stage, msg in (("build", build_error), ("run", run_error)):
        lines = [ln.strip() for ln in (msg or "").strip().splitlines() if ln.strip()]
        if lines:
            return f"{stage}: {lines[-1][:300]}"
    return "no run time and no error message"


def _wait_for_device(rpc, wait: float, lost: int) -> None:
    host, port, key = rpc
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            if registered_servers(host, port, key) > 0:
                return  # back: the search goes on, the lost candidates are measured another time
        except DeviceError:
            pass
        time.sleep(1.0)
    raise DeviceError(f"device '{key}' at tracker {host}:{port} dropped: {lost} candidates in a row were "
                      f"lost and it did not come back within {wait:.0f}s")


def _search(task, target, todo, db, db_dir, builder, runner, callbacks, per_iter, population) -> None:
    """One MetaSchedule search of `todo` candidates for `task`, recorded through `callbacks`."""
    ms.tune.tune_tasks(tasks=[_context(task, target, population)], task_weights=[1.0], work_dir=str(db_dir),
                       max_trials_global=todo, num_trials_per_iter=min(per_iter, todo), builder=builder,
                       runner=runner, database=db, measure_callbacks=callbacks, task_scheduler="round-robin")


def _context(task, target, population: int = 256):
    with without_tensor_intrinsics():  # plain LLVM rules: no int8 tensor intrinsics needed
        space = ms.space_generator.PostOrderApply(sch_rules=ms.ScheduleRule.create("llvm"),
                                                  postprocs=ms.Postproc.create("llvm"),
                                                  mutator_probs=ms.Mutator.create("llvm"))
        return ms.TuneContext(mod=task.workload, target=target, space_generator=space,
                              search_strategy=ms.search_strategy.EvolutionarySearch(population_size=population),
                              task_name=task.name)


def tune(model, target_name: str, trials: int, db_dir, rpc: tuple[str, int, str] | None = None,
         only: str | None = None, max_tasks: int | None = None, per_iter: int = 16,
         device_wait: float = 30.0, verbose: bool = True, population: int = 256) -> dict:
    """Tune `model`'s kernels for `target_name` into db_dir; -> the session dict (session.json)."""
    spec = get_target(target_name)
    if not spec.strategy.tunable:
        raise TargetError(f"tuning target '{target_name}' ({spec.tvm_target().kind.name} GPU kernels) is not "
                          f"supported: compiler.tuning searches and times CPU (llvm) kernels only, and this TVM "
                          f"build has no OpenCL runtime to time GPU kernels with; build it untuned "
                          f"(compiler.build --target {target_name}: dlight GPU schedules)")
    spec.check_toolchain()
    if not spec.runs_on_host and rpc is None:
        raise TargetError(f"target '{target_name}' does not run on this machine: measure on the device with "
                          f"--rpc-tracker HOST:PORT --rpc-key {spec.rpc_key_hint or 'KEY'}")
    db_dir = Path(db_dir)
    db_dir.mkdir(parents=True, exist_ok=True)
    for line in tdb.repair(db_dir):
        print(f"{db_dir}: {line}", file=sys.stderr)
    session = tdb.read_session(db_dir) if (db_dir / tdb.SESSION).is_file() else \
        {"format": FORMAT, "target": target_name, "model": model.config.name, "shapes": SHAPES, "tasks": []}
    if session.get("target") != target_name:
        raise TuneError(f"{db_dir} holds a session for target '{session.get('target')}'; use another --db "
                        f"for '{target_name}'")

    mod, target = lowered_for_tuning(model, target_name)
    tasks = extract_tasks(mod, session.get("shapes", SHAPES), only=only)[:max_tasks]
    if not tasks:
        raise TuneError(f"no tunable kernels{' match ' + repr(only) if only else ''}")
    entries = {t["hash"]: t for t in session["tasks"]}
    builder, runner = make_builder(spec), make_runner(spec, rpc)
    db = tdb.open_database(db_dir)
    for i, task in enumerate(tasks):
        h = tdb.workload_hash(task.workload)
        entry = entries.setdefault(h, {"name": task.name, "kernel": task.kernel, "entry": task.entry,
                                       "bucket": task.bucket, "hash": h, "shape": task.shape, "tune_s": 0.0})
        entry.update(calls=task.weight, flops=task.flops)
        if h not in [t["hash"] for t in session["tasks"]]:
            session["tasks"].append(entry)
        if "untuned_s" not in entry:
            untuned = untuned_module(task, target, spec)
            try:
                try:
                    entry["untuned_s"] = measure(builder, runner, target, untuned, task.workload)
                except DeviceError:
                    if rpc is None:
                        raise
                    _wait_for_device(rpc, device_wait, 1)  # back: measure it again
                    entry["untuned_s"] = measure(builder, runner, target, untuned, task.workload)
            except MeasureError as err:
                entry["untuned_s"], entry["untuned_error"] = None, str(err)
            tdb.write_session(db_dir, session)
        done = len(tdb.records_by_workload(db_dir).get(h, []))
        bar = tqdm(total=trials, initial=min(done, trials), desc=f"[{i + 1}/{len(tasks)}] {task.name}"[:48],
                   unit="trial", disable=not verbose, leave=True)
        start = time.monotonic()
        counts = {}
        try:
            for _ in range(MAX_ROUNDS):  # a round that lost candidates to the device is followed by one more
                if done >= trials:
                    break
                lost = counts.get("lost", 0)
                callbacks = [_recorder(db, task.workload, target, bar, rpc, device_wait, counts),
                             ms.measure_callback.RemoveBuildArtifact(), ms.measure_callback.UpdateCostModel()]
                try:
                    _search(task, target, trials - done, db, db_dir, builder, runner, callbacks, per_iter, population)
                except Exception as err:  # noqa: BLE001 - a kernel MetaSchedule cannot schedule: go on
                    if "dropped" in counts:
                        raise counts["dropped"] from err
                    if isinstance(err, DeviceError):
                        raise
                    entry["error"] = str(err).strip().splitlines()[-1][:300]
                    print(f"warning: {task.name} not tuned: {entry['error']}", file=sys.stderr)
                    break
                done = len(tdb.records_by_workload(db_dir).get(h, []))
                if counts.get("lost", 0) == lost:  # nothing lost: the search space gave what it had
                    break
        finally:
            bar.close()
            entry["tune_s"] = entry.get("tune_s", 0.0) + time.monotonic() - start
            seconds = tdb.records_by_workload(db_dir).get(h, [])
            best = [s for s in seconds if s < tdb.FAILED]
            entry.update(trials=len(seconds), best_s=min(best) if best else None)
            if counts.get("failed"):
                entry["failures"] = entry.get("failures", []) + counts["failed"]
            tdb.write_session(db_dir, session)
    check_static(session, db_dir, mod, target, builder, runner, verbose=verbose)
    check_replays(session, db_dir, mod, target, spec, builder, runner, verbose)
    return session


def _us(s):
    return "-" if s is None else f"{s * 1e6:.1f}"


def table(session: dict) -> str:
    rows = [f"{'task':<44} {'calls':>5} {'untuned us':>10} {'tuned us':>9} {'speedup':>7} {'trials':>6} {'min':>5}  "
            f"side by side: untuned / tuned us"]
    for t in session["tasks"]:
        untuned, best = t.get("untuned_s"), t.get("best_s")
        gain = f"{untuned / best:.2f}x" if untuned and best else "-"
        check = t.get("check")
        side = f"{_us(check['untuned_s'])} / {_us(check['tuned_s'])}" if check else "-"
        rows.append(f"{t['name'][:44]:<44} {t.get('calls', 0):>5} {_us(untuned):>10} {_us(best):>9} {gain:>7} "
                    f"{t.get('trials', 0):>6} {t.get('tune_s', 0) / 60:>5.1f}  {side}")
    return "\n".join(rows)


def plot(session: dict, db_dir, path) -> Path:
    """Best latency vs trials, one panel per task, the untuned latency dashed."""
    import matplotlib  # deferred on purpose: the plot is the only use, and the backend must be set first
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred with matplotlib, after use("Agg")

    records = tdb.records_by_workload(db_dir)
    tasks = [t for t in session["tasks"] if records.get(t["hash"])]
    cols = min(4, max(1, len(tasks)))
    rows = max(1, -(-len(tasks) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, t in zip(axes.flat, tasks):
        curve = tdb.best_so_far(records[t["hash"]])
        xs = [i + 1 for i, v in enumerate(curve) if v is not None]
        ax.plot(xs, [v * 1e6 for v in curve if v is not None], marker=".", label="best tuned")
        if t.get("untuned_s"):
            ax.axhline(t["untuned_s"] * 1e6, ls="--", color="gray", label="untuned")
        ax.set_title(t["name"][:40], fontsize=8)
        ax.set_xlabel("trials", fontsize=8)
        ax.set_ylabel("us", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    if tasks:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{session.get('model')} on {session.get('target')}: best latency vs trials", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):

    p = argparse.ArgumentParser(prog="python -m compiler.tuning", description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, help=f"one of: {', '.join(TARGETS)}")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--preset", default=None, help="tune a preset's shapes (no checkpoint needed)")
    p.add_argument("--trials", type=int, required=True, help="measured candidates per task")
    p.add_argument("--db", type=Path, required=True, help="tuning database directory (created, resumed)")
    p.add_argument("--rpc-tracker", type=parse_tracker, default=None, metavar="HOST:PORT")
    p.add_argument("--rpc-key", default=None)
    p.add_argument("--tasks", default=None, help="only tasks whose name matches this regex")
    p.add_argument("--max-tasks", type=int, default=None)
    p.add_argument("--per-iter", type=int, default=16)
    p.add_argument("--device-wait", type=float, default=30.0)
    p.add_argument("--population", type=int, default=256, help="evolutionary search population per round")
    p.add_argument("--plot", type=Path, default=None)
    a = p.parse_args(argv)
    if (a.rpc_tracker is None) != (a.rpc_key is None):
        p.error("--rpc-tracker and --rpc-key go together")
    rpc = (*a.rpc_tracker, a.rpc_key) if a.rpc_tracker else None
    try:
        model = shape_only_model(a.preset) if a.preset else load_checkpoint(a.checkpoint)
        session = tune(model, a.target, a.trials, a.db, rpc, a.tasks, a.max_tasks, a.per_iter, a.device_wait,
                       population=a.population)
    except (TargetError, CheckpointError, TuneError, DeviceError, tdb.TuningDBError) as e:
        sys.exit(f"error: {e}\n(the database in {a.db} keeps every finished measurement; run the same "
                 f"command again to resume)" if isinstance(e, DeviceError) else f"error: {e}")
    print(table(session))
    if session.get("replays"):
        print("\nbucket records replayed on the dynamic kernels (the build applies one only where it is nowhere "
              "slower):\n" + replay_table(session))
    png = plot(session, a.db, a.plot or a.db / "tuning.png")
    print(f"database: {a.db} (apply with compiler.build --tuning-db {a.db}); plot: {png}")


if __name__ == "__main__":
    main()
