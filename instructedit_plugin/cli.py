"""The ``instructedit`` command line.

Subcommands are table-driven (name -> handler) so each one stays a small
function; every handler returns a process exit code.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

LOG = logging.getLogger("instructedit_plugin.cli")

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_ERROR = 1


def collect_info() -> dict[str, Any]:
    """What a user needs to know before editing: EasyEdit flavour, methods, device, paths."""
    import torch
    import transformers

    from . import __version__
    from .compat.easyeditor_loader import EasyEditNotInstalledError
    from .models.cache import cache_dir
    from .registry import register, registered_algorithms

    info: dict[str, Any] = {
        "instructedit_plugin": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cache_dir": str(cache_dir()),
        "data_dir": os.environ.get("INSTRUCTEDIT_DATA_DIR") or "(not set: pass --data_dir or set INSTRUCTEDIT_DATA_DIR)",
    }
    try:
        easyedit = register()
    except EasyEditNotInstalledError as exc:
        info["easyedit"] = {"flavour": None, "error": str(exc)}
    else:
        alg_dict = sys.modules["easyeditor.util.alg_dict"].ALG_DICT
        train_dict = sys.modules["easyeditor.util.alg_train_dict"].ALG_TRAIN_DICT
        info["easyedit"] = {
            "flavour": easyedit.flavour,
            "location": easyedit.location,
            "placeholder_modules": sorted(easyedit.stubbed_modules),
            "ALG_DICT": sorted(alg_dict),
            "ALG_TRAIN_DICT": sorted(train_dict),
        }
    info["plugin_algorithms"] = sorted(registered_algorithms())
    return info


def _format_info(info: dict[str, Any]) -> str:
    lines = []
    for key, value in info.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines.extend(f"  {k}: {', '.join(v) if isinstance(v, list) else v}" for k, v in value.items())
        else:
            lines.append(f"{key}: {', '.join(value) if isinstance(value, list) else value}")
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    sys.stdout.write((json.dumps(info, indent=2) if args.json else _format_info(info)) + "\n")
    return EXIT_OK


COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None]]] = {
    "info": (
        "show the detected EasyEdit flavour, registered methods, device and where models/data are found",
        cmd_info,
        lambda p: p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table"),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instructedit",
        description="InstructEdit and InstructEd knowledge editing on top of EasyEdit.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, _, add_arguments) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # EasyEdit configures the root logger at INFO when imported; the CLI decides instead.
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from .errors import PluginError

    try:
        import instructedit_plugin  # noqa: F401  (registers into EasyEdit, which resets logging)

        logging.getLogger().setLevel(logging.INFO if args.verbose else logging.WARNING)
        return COMMANDS[args.command][1](args)
    except PluginError as exc:
        sys.stderr.write(f"instructedit: error: {exc}\n")
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
