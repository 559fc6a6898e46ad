"""The trainer: joins the stages of the data flow into Algorithm 1 (docs/architecture.md).

    run.py       entry: a single run or a multi-stage recipe, stop signals (`s2lpo train`)
    loop.py      the loop of one run, read top to bottom as Algorithm 1
    pipeline.py  each step's scored groups: collected in step, or one step ahead (run.max_staleness)
    build.py     every component of a run from its config
    stages.py    multi-stage recipes (model hand-off as HF directories, resume)
    metrics.py   per-step metrics and their sinks
    run_dir.py   whether a run directory may start or continue a run
    stop_signal.py  SIGUSR1 / SIGTERM as a request to checkpoint and stop
    evaluate.py  `s2lpo eval` and `s2lpo explore`

Importing the package imports none of them (the launcher reads stop_signal.py's constants
without torch).
"""
