"""The sandbox platform: a stand-in `akig-backend` the runbooks are tested and drilled against.

Product code (deployments, flows, tasks) never imports this package (import-linter contract);
tests, benches and demos do. See docs/sandbox.md.
"""
