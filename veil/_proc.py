"""Facts about running processes, read from /proc."""
from __future__ import annotations


def peak_rss_bytes(pid: int | str = "self") -> int:
    """The resident-set high-water mark (``VmHWM``) of a process, 0 when unknown.

    Not getrusage's ru_maxrss: Linux carries that across exec."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
