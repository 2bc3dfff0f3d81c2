"""DragKit: point-based drag editing for ComfyUI (DragDiffusion, GoodDrag, FastDrag).

Registers the pack's nodes (legacy node API; see docs/development.md,
"Layout", for why) and its web folder. Importing it is cheap: the node modules
import only torch, ComfyUI modules already loaded by the host, and the pure
torch engine in ``dragkit/``.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
