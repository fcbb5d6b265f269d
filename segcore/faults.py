"""How every entry point reports and survives faults, in one place: errors squeezed onto
one line, out-of-memory recognised whatever raised it, and processes that die with their
parent (``kill -9`` included) so that no orphan keeps training or writing.

Imports nothing heavy (torch only inside :func:`is_oom`).
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


def one_line(text: object, limit: int = 400) -> str:
    """An error text squeezed onto one line (library messages may span several)."""
    s = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return s if len(s) <= limit else s[:limit - 3] + "..."


def is_oom(e: BaseException) -> bool:
    """CUDA and CPU allocator failures (``DefaultCPUAllocator: can't allocate memory``)."""
    text = str(e).lower()
    if isinstance(e, MemoryError) or "out of memory" in text or \
            "can't allocate memory" in text or "cannot allocate memory" in text:
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(e, torch.OutOfMemoryError)


def die_with_parent(parent: int | None = None, driver: int | None = None) -> None:
    """SIGKILL this process when its parent dies (Linux; elsewhere nothing).

    Args:
        parent: the pid the parent had when this process was started; if the parent is
            already gone (this process was re-parented before the call: to init, or to a
            subreaper such as ``systemd --user`` or ``tini -s``), die now. ``None``
            between fork and exec (``preexec_fn``), where the parent is alive by
            construction.
        driver: a further ancestor whose death ends this process too (the sweep's
            driver, whose job this is): if it is gone already, die now.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    gone = parent is not None and os.getppid() != parent
    if driver is not None and not gone:
        try:
            os.kill(driver, 0)
        except ProcessLookupError:
            gone = True
        except PermissionError:
            pass  # alive, another user's
    if gone:
        os.kill(os.getpid(), signal.SIGKILL)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``scancel``, a Slurm time limit, preemption, a container stop), raised in
    the main thread so that every ``except KeyboardInterrupt`` handles it as Ctrl-C:
    results written are kept, and the message says how to continue."""

    def __str__(self) -> str:
        return "SIGTERM"


def handle_sigterm() -> None:
    """From now on SIGTERM raises :class:`Terminated` in the main thread (call it there)."""
    def _raise(signum: int, frame: object) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, _raise)


def interruption(e: BaseException) -> str:
    """How a run was interrupted, for messages: ``SIGTERM`` or ``Ctrl-C``."""
    return "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"
