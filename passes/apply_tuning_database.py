"""ApplyTuningDatabase: schedule kernels with the MetaSchedule records of a compiler.tuning session.

Before (decode: int4_matmul has a symbolic row count m, one token makes it 1):
    lv = R.call_tir(int4_matmul, (x, w, s), R.Tensor((1, 64), "float32"))
After:
    lv = R.call_tir(int4_matmul_tuned, (x, w, s), R.Tensor((1, 64), "float32"))
    # int4_matmul_tuned: int4_matmul specialized to m = 1 exactly as compiler.tuning made the task
    # (kernel_workloads.py), scheduled by relax.transform.MetaScheduleApplyDatabase from the task's
    # best record
A kernel called with free dims (prefill's token count, decode's context length) keeps them and
gets one of its shape buckets' records replayed on it (replay_record): the one compiler.tuning measured
replayed on the whole kernel as nowhere slower than the default schedule at its check shapes, with
the largest mean speedup (compiler/tuning/replay.py; none such: the default schedule stays): the record's tile sizes
become constant split factors with the outermost inferred (a predicate takes the remainder of a
free dim), then MetaSchedule's postprocessors lower its parallel / vector / unroll decisions. A
replay that fails (our INT4 matmul's tile/tail blocks differ between static and dynamic row
counts), or whose kernel does not compile, leaves the kernel to the default schedules.

Only records faster than the build's own schedule (the untuned latency compiler.tuning measured,
session.json) are used; the database must have been tuned for this build's target. `report` gets
{"db", "static": [...], "replayed": [...], "skipped": [...]} for the manifest.
"""
from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.database import MemoryDatabase, TuningRecord
from tvm.s_tir.meta_schedule.tune_context import _normalize_mod  # TVM's private helper: no public equivalent in 0.27
from tvm.s_tir.schedule import Instruction, Trace

from .kernel_workloads import builds, call_dims, is_buffer, is_call_tir, is_tunable, model_dims, resolve, specialize, \
    without_tensor_intrinsics, workload


@relax.expr_functor.mutator
class _Redirect(relax.PyExprMutator):
    """Point statically-shaped calls at specialized, tuned copies; collect dynamic candidates."""

    def __init__(self, mod, tuned, target, memory_db, shapes):
        super().__init__(mod)
        self.mod_in, self.tuned, self.target, self.memory_db, self.shapes = mod, tuned, target, memory_db, shapes
        self.entry_dims, self.added, self.dynamic, self.static = {}, {}, {}, []

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not is_call_tir(call):
            return call
        callee = call.args[0]
        prim = self.mod_in[callee]
        if not isinstance(prim, tirx.PrimFunc) or not is_tunable(prim) or prim.attrs.get("tirx.is_scheduled", False):
            return call
        dims = call_dims(prim, call)
        values = resolve(dims, {}, self.entry_dims)
        if values is None:  # free dims: the kernel may get a bucket's record replayed
            for bucket in self.shapes.get(self.entry, []):
                vals = resolve(dims, bucket, self.entry_dims)
                hit = vals is not None and self.tuned.best(workload(specialize(prim, vals)), self.target)
                if hit:
                    self.dynamic.setdefault(callee, []).append(hit)
            return call
        wl = workload(specialize(prim, values))
        hit = self.tuned.best(wl, self.target)
        if not hit:
            return call
        record, secs, task = hit
        key = task["hash"]
        if key not in self.added:
            wl_db = self.memory_db.commit_workload(wl)
            self.memory_db.commit_tuning_record(TuningRecord(record.trace, wl_db, record.run_secs, self.target,
                                                             record.args_info))
            func = wl["main"].without_attr("global_symbol")
            self.added[key] = self.builder_.add_func(func, f"{callee.name_hint}_tuned")
            self.static.append({"kernel": self.added[key].name_hint, "task": task["name"],
                                "tuned_us": round(secs * 1e6, 3), "untuned_us": _us(task.get("untuned_s"))})
        args = [a for p, a in zip(prim.params, call.args[1].fields) if is_buffer(p) or p not in values]
        return relax.call_tir(self.added[key], args, call.ty_args[0])


def _us(seconds):
    return None if seconds is None else round(seconds * 1e6, 3)


def fixed_tiles(trace):
    """The trace with every SamplePerfectTile decision written into its Split as constant factors,
    the outermost one inferred (None): on a loop of unknown extent the split keeps the record's
    inner tiles and predicates the remainder, instead of failing to replay the sampling."""
    decisions, subst, insts, kept = dict(trace.decisions), [], [], {}

    def value(x):
        for rv, v in subst:
            if isinstance(x, tvm.runtime.Object) and rv.same_as(x):
                return v
        return x

    for inst in trace.insts:
        if inst.kind.name == "SamplePerfectTile":
            for i, (rv, factor) in enumerate(zip(inst.outputs, decisions[inst])):
                subst.append((rv, None if i == 0 else tirx.IntImm("int64", int(factor))))
            continue
        new = Instruction(inst.kind, [value(x) for x in inst.inputs], inst.attrs, inst.outputs)
        insts.append(new)
        if inst in decisions:
            kept[new] = decisions[inst]
    return Trace(insts, kept)


def replay_record(prim: tirx.PrimFunc, record, target) -> tuple[tirx.PrimFunc | None, str]:
    """`record` (tuned on a static specialization of `prim`) applied to `prim` itself: its trace
    with fixed tiles, then MetaSchedule's LLVM postprocessors (which lower the parallel / vector /
    unroll annotations) minus DisallowDynamicLoop."""
    mod = _normalize_mod(prim)
    try:
        sch = tvm.s_tir.Schedule(mod)
        fixed_tiles(record.trace).apply_to_schedule(sch, remove_postproc=True)
        with without_tensor_intrinsics():
            ctx = ms.TuneContext(mod=mod, target=target, task_name="replay",
                                 space_generator=ms.space_generator.PostOrderApply(
                                     sch_rules=[], postprocs=ms.Postproc.create("llvm"), mutator_probs={}))
        for post in ctx.space_generator.postprocs:
            if type(post).__name__ != "DisallowDynamicLoop" and not post.apply(sch):
                return None, f"postprocessor {type(post).__name__} rejected the replayed schedule"
    except Exception as err:  # noqa: BLE001 - any schedule error: keep the default schedule
        return None, f"replay failed: {str(err).strip().splitlines()[-1]}"
    scheduled = sch.mod["main"]
    if not (prim.attrs and "global_symbol" in prim.attrs):  # _normalize_mod named it "main"
        scheduled = scheduled.without_attr("global_symbol")
    scheduled = scheduled.with_attr("tirx.is_scheduled", True)
    why = builds(scheduled, target)
    return (None, f"does not build: {why}") if why else (scheduled, "")


@tvm.transform.module_pass(opt_level=0, name="ApplyTuningDatabase")
class ApplyTuningDatabase:
    """`open_reader()` -> the database's reader (compiler.tuning.database.TunedKernels: .db_dir,
    .shapes, .best(workload, target), .pick_replay(kernel, hits)), opened when the pass runs."""

    def __init__(self, open_reader, report: dict | None = None):
        self.open_reader, self.report = open_reader, report

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        target = tvm.target.Target.current(allow_none=False)
        tuned = self.open_reader()
        memory_db = MemoryDatabase()
        rw = _Redirect(mod, tuned, target, memory_db, tuned.shapes)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rw.entry, rw.entry_dims = gv.name_hint, model_dims(func)
                rw.builder_.update_func(gv, rw.visit_expr(func))
        mod = rw.builder_.get()

        replayed, skipped = [], []
        for callee, hits in rw.dynamic.items():  # the record measured fastest on the whole kernel, if any
            hit, why = tuned.pick_replay(callee.name_hint, hits)
            if hit is None:
                skipped.append({"kernel": callee.name_hint, "task": None, "why": why})
                continue
            record, secs, task = hit
            func, why = replay_record(mod[callee], record, target)
            row = {"kernel": callee.name_hint, "task": task["name"], "tuned_us": _us(secs),
                   "untuned_us": _us(task.get("untuned_s"))}
            if func is None:
                skipped.append({**row, "why": why})
            else:
                mod[callee] = func
                replayed.append(row)

        with target, memory_db:  # MetaScheduleApplyDatabase reads the target when it is made
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        for row in rw.static:
            if not mod[row["kernel"]].attrs.get("tirx.is_scheduled", False):
                skipped.append({**row, "why": "MetaScheduleApplyDatabase found no record"})
        mod = relax.transform.DeadCodeElimination()(mod)
        if self.report is not None:
            self.report.update({"db": tuned.db_dir, "static": [r for r in rw.static if r not in skipped],
                                "replayed": replayed, "skipped": skipped})
        return mod
