"""`latentlab sweep`: a grid of runs from one YAML file; resumable, one job per GPU.

A sweep file names a base run config, a grid of dotted config keys and their values, and the
upstream runs jobs start from (a Base that latent methods continue from, referred to as
`${upstream.NAME}`). `spec` reads the file, `plan.load_sweep` expands it into jobs, each a
validated `RunConfig` with its own run directory `OUT_DIR/<job name>`; `execute.run_sweep`
trains them, upstreams first. A finished run is skipped and an interrupted one resumed, so
running a sweep again continues where it stopped; a job that fails is recorded in
`OUT_DIR/sweep_status.json` and the others go on.
docs/sweeps_reports.md describes the file format.
"""

from latentlab.study.sweep.execute import SweepResult, plan_table, run_plan, run_sweep
from latentlab.study.sweep.plan import Job, SweepPlan, load_sweep, select

__all__ = ["Job", "SweepPlan", "SweepResult", "load_sweep", "plan_table", "run_plan",
           "run_sweep", "select"]
