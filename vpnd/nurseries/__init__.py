"""The daemon's services: each `run_x(app, ..., *, task_status)` is one child of the root nursery."""
