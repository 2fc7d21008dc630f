"""Game-day drills: real faults on a real monitoring stack, timed from the fault to recovery.

`make drill [NAME]` (`python -m drills`) starts Prometheus, the exporters, Alertmanager and
the `make run` stack, injects each drill's fault and records its timeline (docs/drills.md).
Tests and scripts import this package; product code (deployments, flows, tasks) never does
(import-linter contract).
"""
