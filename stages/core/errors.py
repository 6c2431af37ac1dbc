"""User errors: one clear line, exit status 2, no traceback.

Every mistake a user can fix (a bad flag, a missing file, a wrong column) is raised as
`UserError` with a message that names the flag or file and the fix. `main_guard` turns it
into that line on stderr and exit status 2; `RunStopped` (training stopped on purpose) into one
line and status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from collections.abc import Callable


class UserError(Exception):
    """An input mistake the user can fix; printed as one line, exit status 2."""


class RunStopped(Exception):
    """Training stopped on purpose (e.g. a non-finite loss); printed as one line, exit status 1."""


def _finish_multi_rank_run() -> None:
    """End a successful multi-rank run: destroy this rank's process group, then exit at once.

    A rank that is done (e.g. not rank 0, which still writes the outputs) otherwise goes through
    interpreter finalization while its peers still talk to it, and the process group's native
    threads can then abort the process ("terminate called without an active exception", exit
    -6), which fails the whole launch after a good run. Destroying the group first made this
    rare, not impossible (2 of ~25 two-rank launches of one suite run). So after the group is
    gone the rank runs the exit handlers Python would run (W&B's finish, logging, temporary
    folders) and leaves with os._exit(0), skipping the finalization where the abort happens.
    Worlds of one are left alone (a stage run in-process keeps its group), and so is a process
    with a non-daemon thread still running, which the interpreter has to wait for.
    """
    distributed = sys.modules.get("torch.distributed")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or distributed is None or not distributed.is_initialized():
        return
    distributed.destroy_process_group()
    if any(thread.is_alive() and not thread.daemon and thread is not threading.main_thread()
           for thread in threading.enumerate()):
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main_guard(entrypoint: Callable[[list[str] | None], object]) -> Callable[[list[str] | None], None]:
    """Wrap a stage's `run_*` so a `UserError` ends the process with one line and status 2."""

    def main(argv: list[str] | None = None) -> None:
        # bitsandbytes (imported by transformers through peft) warns at import, on CPUs with
        # AVX512-BF16, that an optional hub kernel is missing: noise before every log and error.
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        try:
            entrypoint(argv)
            _finish_multi_rank_run()
        except UserError as err:
            # Under the DeepSpeed launcher every rank usually hits the same validation error:
            # rank 0 prints it at once and exits, and the launcher then kills the others. A
            # rank that is alone with its error still says it, after a pause that lets the
            # launcher stop it first in the common case (so the line is printed once).
            rank = os.environ.get("RANK", "0")
            if rank != "0":
                time.sleep(3)
            print(f"error: {err}" if rank == "0" else f"error (rank {rank}): {err}", file=sys.stderr, flush=True)
            sys.exit(2)
        except RunStopped as err:  # every rank may stop at once: each says which it is
            print(f"stopped (rank {os.environ.get('RANK', '0')}): {err}", file=sys.stderr, flush=True)
            sys.exit(1)
        except Exception as err:
            # A bug: the traceback stays. With several ranks, one line first says which rank
            # failed (the launcher then stops the others, whose own errors are only echoes).
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                print(f"rank {os.environ.get('RANK', '?')} failed: {type(err).__name__}: {err}", file=sys.stderr,
                      flush=True)
            raise

    return main
