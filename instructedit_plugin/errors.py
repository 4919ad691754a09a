"""Exception types shared by the whole plugin.

Every error a user can trigger with bad input derives from :class:`PluginError`
(a ``ValueError``), names the offending field and says how to fix it, so that a
typo in a YAML file or a malformed dataset record fails loudly at load time
instead of silently training or editing the wrong thing.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator


class PluginError(ValueError):
    """Base class for user-facing errors raised by instructedit-plugin."""


class HyperParamsError(PluginError):
    """An hparams YAML (or hparams object) has a missing, unknown or invalid field."""

    def __init__(self, field: str, problem: str, fix: str, source: str | None = None):
        self.field = field
        self.problem = problem
        self.fix = fix
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}field '{field}': {problem}. Fix: {fix}")


class DataSchemaError(PluginError):
    """A dataset file does not have the schema its loader expects."""

    def __init__(self, path: str, index: int | None, key: str, problem: str):
        self.path = str(path)
        self.index = index
        self.key = key
        self.problem = problem
        at = f"record {index}" if index is not None else "file"
        super().__init__(f"{path}: {at}: key '{key}': {problem}")


class RequestError(PluginError):
    """An edit request (prompts, targets, locality/portability inputs) is malformed."""


class MissingDependencyError(ImportError):
    """An optional third-party package is needed for the feature being used."""

    def __init__(self, package: str, feature: str, pip_name: str | None = None):
        self.package = package
        self.feature = feature
        pip_name = pip_name or package
        super().__init__(
            f"'{package}' is not installed, but {feature} needs it. "
            f"Install it with: pip install {pip_name}"
        )


# ---------------------------------------------------------------------------------- CLI wording
#: True while the ``instructedit`` command line runs a command: fixes then name CLI options and
#: commands (``--archive``, ``instructedit train ...``) instead of Python calls.
_ON_CLI: contextvars.ContextVar[bool] = contextvars.ContextVar("instructedit_plugin_on_cli", default=False)


@contextlib.contextmanager
def cli_context() -> Iterator[None]:
    """Within this block, error fixes use the command line's wording (see :func:`fix_for`)."""
    token = _ON_CLI.set(True)
    try:
        yield
    finally:
        _ON_CLI.reset(token)


def on_cli() -> bool:
    """Whether the ``instructedit`` command line is running the current command."""
    return _ON_CLI.get()


def fix_for(python: str, cli: str) -> str:
    """The fix to print: ``cli`` on the command line (:func:`cli_context`), else ``python``."""
    return cli if on_cli() else python
