"""Dataset loaders that turn knowledge-editing benchmarks into EasyEdit request dicts.

Each format family has its own small module; this package maps format names
to loaders in :data:`LOADERS` and offers :func:`load_requests`, which guesses
the format from the file name or the first record when none is given. Every
loader checks each record's schema and raises
:class:`~instructedit_plugin.errors.DataSchemaError` (file, record index, key)
on a mismatch. See :mod:`.common` for the request layout.

Formats: ``knowedit``, ``counterfact_mend``, ``counterfact_rome``,
``counterfact_rome_ins``, ``counterfact_subject_replace``, ``zsre_mend``,
``zsre_mend_ins``, ``zsre_mend_dec``, ``zsre_subject_replace``,
``zsre_inverse_relation``, ``convsent``, ``mquake`` (flat edits; use
:func:`load_mquake` for whole multi-hop cases).

InstructEdit's task-descriptions file (``easyedit_task_descriptions.json``) is an
instruction library, not edit records: read it with :func:`load_task_descriptions`
(``{task: [description, ...]}``); :func:`load_requests` refuses it with that fix.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

from ..errors import PluginError
from .common import Request
from .convsent import load_convsent
from .counterfact_rome import load_counterfact_rome
from .guess import guess_format
from .instructed_release import (
    load_counterfact_rome_ins,
    load_counterfact_subject_replace,
    load_zsre_inverse_relation,
    load_zsre_mend_dec,
    load_zsre_mend_ins,
    load_zsre_subject_replace,
)
from .knowedit import load_knowedit
from .mend_format import load_counterfact_mend
from .mquake import Hop, MQuAKECase, load_mquake, load_mquake_requests
from .paths import DATA_DIR_ENV, resolve_data_dir
from .reader import read_records
from .task_descriptions import (
    TaskDescriptions,
    is_task_descriptions_name,
    load_task_description_file,
    load_task_descriptions,
)
from .zsre import load_zsre_mend

LOG = logging.getLogger(__name__)

Loader = Callable[..., list[Request]]

#: Format name -> loader ``(path, limit=None) -> list[request dict]``.
LOADERS: dict[str, Loader] = {
    "knowedit": load_knowedit,
    "counterfact_mend": load_counterfact_mend,
    "counterfact_rome": load_counterfact_rome,
    "counterfact_rome_ins": load_counterfact_rome_ins,
    "counterfact_subject_replace": load_counterfact_subject_replace,
    "zsre_mend": load_zsre_mend,
    "zsre_mend_ins": load_zsre_mend_ins,
    "zsre_mend_dec": load_zsre_mend_dec,
    "zsre_subject_replace": load_zsre_subject_replace,
    "zsre_inverse_relation": load_zsre_inverse_relation,
    "convsent": load_convsent,
    "mquake": load_mquake_requests,
}

FORMATS: tuple[str, ...] = tuple(LOADERS)

__all__ = [
    "DATA_DIR_ENV", "FORMATS", "LOADERS", "Hop", "MQuAKECase", "Request", "TaskDescriptions",
    "get_loader", "guess_format", "load_convsent", "load_counterfact_mend",
    "load_counterfact_rome", "load_counterfact_rome_ins", "load_counterfact_subject_replace",
    "load_knowedit", "load_mquake", "load_mquake_requests", "load_requests",
    "load_zsre_inverse_relation", "load_zsre_mend", "load_zsre_mend_dec", "load_zsre_mend_ins",
    "load_task_description_file", "load_task_descriptions",
    "load_zsre_subject_replace", "read_records", "resolve_data_dir",
]


def get_loader(fmt: str) -> Loader:
    """The loader registered for ``fmt``; PluginError listing the known formats otherwise."""
    try:
        return LOADERS[fmt]
    except KeyError:
        raise PluginError(f"unknown dataset format {fmt!r}. Fix: use one of {', '.join(FORMATS)}, "
                          "or fmt=None to guess it from the file") from None


def load_requests(
    path: str | os.PathLike[str], fmt: str | None = None, limit: int | None = None
) -> list[Request]:
    """Load ``path`` as EasyEdit request dicts, guessing ``fmt`` when it is None.

    ``limit`` reads only the first N records (for MQuAKE: the edits of the first N cases).
    A task-descriptions file (``*task_descriptions.json``) holds instructions, not edits: PluginError.
    """
    if is_task_descriptions_name(path):
        raise PluginError(f"{path} is an instruction library (InstructEdit task descriptions), not edit records. "
                          "Fix: read it with instructedit_plugin.data.load_task_descriptions(path)")
    chosen = fmt if fmt is not None else guess_format(path)
    loader = get_loader(chosen)
    requests = loader(path, limit=limit)
    LOG.debug("loaded %d request(s) from %s as %s", len(requests), path, chosen)
    return requests
