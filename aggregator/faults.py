"""Test hook for crash recovery: `PRUFED_FAULT=<name>` makes the process SIGKILL itself at the named point."""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("prufed.aggregator")

FAULT_ENV = "PRUFED_FAULT"


def fault_point(name: str) -> None:
    """Die here, with no cleanup (like a power cut), when `PRUFED_FAULT` names this point."""
    if os.environ.get(FAULT_ENV) == name:
        log.warning("fault injection: killing self", extra={"fault": name})
        os.kill(os.getpid(), signal.SIGKILL)
