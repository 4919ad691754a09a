"""Shared pytest fixtures. Each fixture family lives in its own module and is re-exported here."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tiny models are dominated by per-op overhead: one thread is faster than two, and
# on a shared 2-core machine extra threads spin against each other (seen: 10x slower).
torch.set_num_threads(int(os.environ.get("INSTRUCTEDIT_TEST_THREADS", "1")))

from ._fixtures_data import *  # noqa: E402,F401,F403
from ._fixtures_models import *  # noqa: E402,F401,F403

# The session fixture with a pretrained tiny base and trained InstructEd prefixes, shared by the
# InstructEd editing, example and demo tests.
from .test_instructed_training import instructed_world  # noqa: E402, F401
