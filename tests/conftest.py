import os
from pathlib import Path

# Generated checkpoints go to one folder per checkout, shared by the test session and
# the Ray replicas it starts (they inherit this environment).
os.environ.setdefault("T2I_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "t2i"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
