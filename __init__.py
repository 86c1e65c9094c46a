"""ComfyUI entry point: ComfyUI imports this package and reads the two mappings below."""
import os
import sys

# The pack's libraries (r0_core, rpo_core) sit beside this file; ComfyUI-Manager installs only requirements.txt,
# so make them importable. Appended, not prepended: ComfyUI's own top-level `nodes` module must win.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
