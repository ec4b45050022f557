"""Test hooks: a rank that stops at a given point, as a killed or crashed process would."""
from __future__ import annotations

import os
import sys

from avcl.parallel.group import current


def test_stop(where: str) -> None:
    """Tests only: ``AVCL_TEST_STOP_RANK=R:WHERE`` makes rank R exit at once (status 3) at ``WHERE``
    (e.g. ``er:1:2``: method er, task 1, epoch 2), as a killed or crashed process would."""
    spec = os.environ.get("AVCL_TEST_STOP_RANK")
    group = current()
    if not spec or group is None:
        return
    target, _, at = spec.partition(":")
    if int(target) == group.rank and at == where:
        sys.stderr.flush()
        os._exit(3)
