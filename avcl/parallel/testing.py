"""Test hooks: a rank that stops at a given point, as a killed or crashed process would."""
from __future__ import annotations

import os
import sys

from avcl.parallel.group import current


def test_stop(where: str) -> None:
    """Tests only: ``AVCL_TEST_STOP_RANK=R:WHERE`` makes rank R exit at once (status 3) at ``WHERE``
    (e.g. ``er:1:2``: method er, task 1, epoch 2; ``er:1:2:5``: after step 5 of that epoch), as a killed or
    crashed process would; in one process ``AVCL_TEST_STOP=WHERE`` does the same."""
    spec = os.environ.get("AVCL_TEST_STOP_RANK")
    group = current()
    if group is None:
        spec = os.environ.get("AVCL_TEST_STOP")
        if spec and spec == where:
            sys.stderr.flush()
            os._exit(3)
        return
    if not spec:
        return
    target, _, at = spec.partition(":")
    if int(target) == group.rank and at == where:
        sys.stderr.flush()
        os._exit(3)
