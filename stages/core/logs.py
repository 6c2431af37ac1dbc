"""Logging of a stage process: INFO on global rank 0, warnings elsewhere, one handler."""

from __future__ import annotations

import logging
import os
import sys


class CurrentStderrHandler(logging.StreamHandler):
    """A stream handler writing to whatever `sys.stderr` is when a record is emitted.

    A plain StreamHandler keeps the stream of the moment it was made; a stage run twice in one
    process (tests, notebooks) after stderr was swapped would write to a closed file.
    """

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler's __init__/setStream: the stream is always sys.stderr
        pass


def setup_logging() -> None:
    """INFO on global rank 0, warnings elsewhere (so the logs are read once, not N times)."""
    import transformers

    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    handler = CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    transformers.utils.logging.set_verbosity(level)
    # One handler, the root's: transformers' own handler would print every line a second time
    # through the root logger where the CI variable is set (it then propagates).
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
