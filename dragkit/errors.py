"""The one exception type the engine raises for bad user input.

Engine functions raise :class:`DragInputError` with a message that names the
input and the fix; the node layer prefixes it with the node's display name so
the user sees e.g. ``[DDIM Invert] steps=3 is too few for strength 0.1 ...``
instead of a stack trace from deep inside torch.
"""


class DragInputError(ValueError):
    """Bad input from the user (points, masks, sizes, schedule settings)."""
