"""``veil compare``: every mode measured end to end on one model, on this machine.

``runner.run`` compiles and exports each workload, starts each remote mode's processes
on loopback (HE server, TEE enclave and its plaintext baseline, MPC parties and dealer),
measures, and stops them; ``report`` and ``plots`` write ``report.md``, ``report.json``
and PNGs; ``claims`` sets the seeds' claimed ranges beside the measured values;
``cli`` is the command line (``python -m veil.compare``).
"""
from ..modes import MODES
from .runner import CompareConfig, run

__all__ = ["MODES", "CompareConfig", "run"]
