"""Shared pytest fixtures. Each fixture family lives in its own module and is re-exported here."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ._fixtures_data import *  # noqa: E402,F401,F403
from ._fixtures_models import *  # noqa: E402,F401,F403
