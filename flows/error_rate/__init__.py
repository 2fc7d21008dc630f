"""The parts of runbook `high-error-rate` (`flows/high_error_rate.py` is the flow and its spec).

- `params`: what a run may do and its thresholds;
- `evidence`: the checks, all at once, and the scenarios (A-D) they support;
- `actions`: one typed action per scenario (rollback, restart, cache clear, database restart);
- `verify`: whether the 5xx ended (while the run waited, and after it acted).
"""
