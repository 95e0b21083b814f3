"""The service's children come from the one launcher in :mod:`veil.deploy.processes`.

``veil serve`` starts its enclaves and MPC roles with it; this name stays for the
callers (benchmarks, tests) that import it from the service.
"""
from ..deploy.processes import (RESTART_MAX_S, RESTART_MIN_S, STABLE_S, START_TIMEOUT_S,
                                _PRCTL, Child, Processes, ProcessError, _die_with_parent,
                                connect_mpc, connect_tee, proc_state)

__all__ = ["Child", "ProcessError", "Processes", "RESTART_MAX_S", "RESTART_MIN_S",
           "STABLE_S", "START_TIMEOUT_S", "connect_mpc", "connect_tee", "proc_state",
           "_PRCTL", "_die_with_parent"]
