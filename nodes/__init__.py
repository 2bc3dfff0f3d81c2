"""ComfyUI node classes of DragKit, one module per node family.

Each module exports ``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS``;
this package merges them for the pack's ``__init__``.
"""

from . import decode, editor, invert, lora, optimize, pixel_warp, points, sam_prompts, sample, wan_tracks, warp

_MODULES = (points, editor, lora, invert, warp, optimize, sample, decode, pixel_warp, sam_prompts, wan_tracks)

NODE_CLASS_MAPPINGS = {key: cls for module in _MODULES for key, cls in module.NODE_CLASS_MAPPINGS.items()}
NODE_DISPLAY_NAME_MAPPINGS = {
    key: name for module in _MODULES for key, name in module.NODE_DISPLAY_NAME_MAPPINGS.items()
}
