"""The logger for task code: the run's logger inside Prefect, a plain one outside (benches)."""

from __future__ import annotations

import logging

from prefect import get_run_logger
from prefect.exceptions import MissingContextError


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The Prefect run logger when in a flow/task run, else the `runbooks` logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("runbooks")
