"""Named points where the fault tests pause or fail a run (off unless the environment asks).

`MLX_DPO_TEST_PAUSE=<point>[:<step>]` makes the process create `MLX_DPO_TEST_PAUSE_FILE` and
sleep there, so a test can kill it at exactly that point (inside a checkpoint write, say).
`MLX_DPO_TEST_FAIL=<point>[:<step>]` raises the OSError a full disk gives (ENOSPC) there.
`MLX_DPO_TEST_SLOW=<seconds>` sleeps after every update, so a test can signal a run mid-way.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path


def _matches(wanted: str | None, name: str, step: int | None) -> bool:
    return bool(wanted) and wanted in (name, f"{name}:{step}")


def point(name: str, step: int | None = None) -> None:
    if name == "update" and os.environ.get("MLX_DPO_TEST_SLOW"):
        time.sleep(float(os.environ["MLX_DPO_TEST_SLOW"]))
    if _matches(os.environ.get("MLX_DPO_TEST_FAIL"), name, step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<{name}>")
    if _matches(os.environ.get("MLX_DPO_TEST_PAUSE"), name, step):
        Path(os.environ["MLX_DPO_TEST_PAUSE_FILE"]).write_text(str(os.getpid()))
        while True:  # until the test kills this process
            time.sleep(1)
