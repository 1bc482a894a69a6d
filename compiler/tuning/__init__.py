"""Tuning: a MetaSchedule session over a model's kernels, and the database a build applies.

    python -m compiler.tuning --target T --trials N --db DIR     (tune.py: the session, its CLI)

    tasks.py      the model's distinct kernels at fixed shapes (tuning tasks); untuned forms
    measure.py    MetaSchedule builder / runner for a target, here or over RPC
    replay.py     after tuning: records checked against the default schedule, as the build uses them
    database.py   the database directory (JSON records + session.json) and its reader, TunedKernels

A build needs only the reader: compiler.pipeline hands `TunedKernels` to the pass that applies it
(passes/apply_tuning_database.py), which derives workloads with passes/kernel_workloads.py as the
session did.
"""
