import os
import sys
from pathlib import Path

import pytest

# Generated checkpoints go to one folder per checkout, shared by the test session and
# the Ray replicas it starts (they inherit this environment).
os.environ.setdefault("T2I_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "t2i"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The session's outcome, for pytest_unconfigure below.
_outcome: list[int] = []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    _outcome.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    # Once, in CI, the interpreter's own teardown crashed (SIGSEGV) after the report
    # ("380 passed"), in native code that the session's libraries leave running (torch's
    # and Ray's threads, compiled modules); two runs since did not. The outcome is
    # decided and reported by now: exit with it rather than run that teardown.
    if _outcome:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_outcome[-1])
