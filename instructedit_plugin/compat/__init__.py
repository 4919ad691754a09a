"""Everything that bridges the two EasyEdit flavours (PyPI 0.0.1.dev0 and GitHub main) lives here."""
from .devices import cuda_strings_to_cpu, map_device, needs_cpu_redirect
from .easyeditor_loader import EasyEditInfo, EasyEditNotInstalledError, easyeditor_available, load_easyeditor
from .editing import make_editor, run_edit_requests
from .hparams_bridge import load_easyedit_hparams

__all__ = [
    "EasyEditInfo",
    "EasyEditNotInstalledError",
    "cuda_strings_to_cpu",
    "easyeditor_available",
    "load_easyedit_hparams",
    "load_easyeditor",
    "make_editor",
    "map_device",
    "needs_cpu_redirect",
    "run_edit_requests",
]
