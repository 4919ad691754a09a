"""Load EasyEdit's *own* hparams classes from one YAML in either flavour.

The two flavours disagree on fields (EasyEdit main's ``FTHyperParams`` requires
``objective_optimization``, PyPI's rejects it; ``MENDHyperParams.alg`` exists only
on PyPI), and their ``from_hparams`` does ``cls(**yaml)``, so one file cannot
serve both. :func:`load_easyedit_hparams` keeps the keys the class declares,
fills flavour-only required fields from :data:`FLAVOUR_DEFAULTS`, and reports
anything else that is missing as a clear error.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any

from ..errors import HyperParamsError
from ..core.config import read_yaml, resolve_named_values

LOG = logging.getLogger(__name__)

#: Required fields that exist in one flavour only, with the value that keeps behaviour equal.
FLAVOUR_DEFAULTS: dict[str, dict[str, Any]] = {
    "FTHyperParams": {"objective_optimization": "target_new"},
    "MENDHyperParams": {"alg": "MEND"},
}


def _read(source: str | os.PathLike | dict) -> tuple[dict[str, Any], str]:
    if isinstance(source, dict):
        return dict(source), "<dict>"
    return read_yaml(source)


_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _as_number(value: Any) -> Any:
    """YAML reads ``5e-3`` as a string; EasyEdit converts such values to float."""
    if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        return float(value)
    return value


def _split_act_margin(data: dict[str, Any], where: str) -> None:
    """WISE's YAML gives ``act_margin: [alpha, beta, gamma]``; EasyEdit main's ``from_hparams`` splits it
    into the dataclass's ``alpha``/``beta``/``gamma`` fields. Done in place, checked first."""
    if "act_margin" not in data:
        return
    margin = data.pop("act_margin")
    if not (isinstance(margin, (list, tuple)) and len(margin) == 3):
        raise HyperParamsError("act_margin", f"must be three numbers [alpha, beta, gamma], got {margin!r}",
                               "write e.g. `act_margin: [5.0, 20.0, 10.0]`", source=where)
    try:
        data["alpha"], data["beta"], data["gamma"] = (float(_as_number(v)) for v in margin)
    except (TypeError, ValueError):
        raise HyperParamsError("act_margin", f"must be three numbers [alpha, beta, gamma], got {margin!r}",
                               "write e.g. `act_margin: [5.0, 20.0, 10.0]`", source=where) from None


#: what an EasyEdit class's own ``from_hparams`` does to the YAML before building the dataclass
FROM_HPARAMS_RULES = {"WISEHyperParams": _split_act_margin}


def load_easyedit_hparams(cls: type, source: str | os.PathLike | dict, **overrides: Any) -> Any:
    """Build EasyEdit hparams class ``cls`` from a YAML path or dict, plus ``overrides``."""
    data, where = _read(source)
    data.update(overrides)
    rule = FROM_HPARAMS_RULES.get(cls.__name__)
    if rule is not None:
        rule(data, where)
    data = resolve_named_values(data)  # model_name: embedded
    fields = {f.name: f for f in dataclasses.fields(cls)}
    dropped = sorted(set(data) - set(fields))
    if dropped:
        LOG.info("%s: %s does not take %s in this EasyEdit flavour; ignored", where, cls.__name__, dropped)
    kwargs = {k: _as_number(v) for k, v in data.items() if k in fields}
    for name, value in FLAVOUR_DEFAULTS.get(cls.__name__, {}).items():
        if name in fields:
            kwargs.setdefault(name, value)
    missing = [n for n, f in fields.items()
               if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise HyperParamsError(missing[0], f"required by {cls.__name__} but missing", f"add `{missing[0]}:` to the YAML", source=where)
    return cls(**kwargs)
