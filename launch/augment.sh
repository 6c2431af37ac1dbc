#!/usr/bin/env bash
""":"
# Valid bash and valid Python. `bash launch/augment.sh [config] [--key value ...]` starts the
# job through the DeepSpeed launcher (ranks, hostfile and config from the environment, see
# launch/deepspeed_args.sh); `deepspeed launch/augment.sh ...` runs the Python below on every rank.
set -euo pipefail
. "$(dirname "$0")/deepspeed_args.sh"
exec deepspeed "${DEEPSPEED_ARGS[@]}" "$0" "$@"
":"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stages.core.launching import launched_main  # noqa: E402

launched_main("augment")
