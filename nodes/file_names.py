"""Checks for the file names users type and the files the pack reads, before any work starts.

:func:`check_save_name` refuses names that fail on some OS or only when the
file is finally written (too long once :mod:`dragkit.atomic` adds its
temporary suffix, NUL and control characters, Windows reserved names and
characters, absolute paths, ``..``, a folder the pack keeps for itself).
:func:`contained_path` resolves symlinks before checking that a file lies
inside the folders it may come from. Messages name files relative to
ComfyUI's folders (``loras/my_edit.safetensors``), never by their absolute
server path.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from ..dragkit.errors import DragInputError

NAME_MAX_BYTES = 255
"""Longest file or folder name (one path component) on ext4, APFS, NTFS (UTF-16 units <= UTF-8 bytes)."""

PATH_MAX_BYTES = 4095
"""Longest absolute path Linux accepts (PATH_MAX less the terminating NUL)."""

TEMP_NAME_EXTRA = len("." + "." + "0" * 32 + ".tmp")
"""Characters :func:`dragkit.atomic.write_bytes_atomic` adds to a name for its temporary file ``.<name>.<uuid hex>.tmp``."""

WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"]
    + [f"{device}{n}" for device in ("COM", "LPT") for n in [*"0123456789", "\u00b9", "\u00b2", "\u00b3"]]
)
"""Device names Windows refuses as a file name, with or without an extension, in any case."""

WINDOWS_FORBIDDEN = '<>:"|?*\\'
"""Characters Windows refuses in file names (``\\`` is a separator there; use ``/`` for sub-folders)."""


def check_save_name(save_name, suffix: str, reserved_folder: str | None = None) -> str | None:
    """The relative file name (with ``suffix``) for a save_name widget, ``None`` when it is empty.

    ``save_name`` may hold sub-folders separated by ``/``; ``suffix`` is
    appended unless the name already ends with it. ``reserved_folder`` (a
    first-level folder the pack writes itself, e.g. its cache) is off limits.

    Raises:
        DragInputError: naming what is wrong with the name.
    """
    if not isinstance(save_name, str):
        raise DragInputError(f"save_name must be text, got {type(save_name).__name__}")
    name = save_name.strip()
    if not name:
        return None
    shown = _shown(name)
    bad = sorted({c for c in name if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp")})
    if bad:
        codes = ", ".join(f"U+{ord(c):04X}" for c in bad[:5])
        raise DragInputError(f"save_name {shown} holds control or invalid characters ({codes}); use letters, digits, - and _")
    forbidden = sorted({c for c in name if c in WINDOWS_FORBIDDEN})
    if forbidden:
        raise DragInputError(
            f"save_name {shown} holds {' '.join(forbidden)}, which Windows refuses in file names; "
            "use / to name a sub-folder"
        )
    if name.startswith("/"):
        raise DragInputError(f"save_name {shown} is an absolute path; give a name inside the folder, e.g. my_edit")
    if not name.endswith(suffix):
        name += suffix
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise DragInputError(
                f"save_name {shown} has an empty, '.' or '..' folder; give a name inside the folder, e.g. sub/my_edit"
            )
        if part != part.rstrip(". "):
            raise DragInputError(f"save_name {shown}: the name {_shown(part)} ends in a dot or space, which Windows refuses")
        stem = part.split(".")[0].rstrip(" ").upper()
        if stem in WINDOWS_RESERVED:
            raise DragInputError(f"save_name {shown}: {_shown(part)} is a reserved device name on Windows; choose another name")
    if reserved_folder is not None and len(parts) > 1 and parts[0].casefold() == reserved_folder.casefold():
        raise DragInputError(f"save_name {shown} is inside {reserved_folder}/, which DragKit keeps for its own cache; choose another folder")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        limit = NAME_MAX_BYTES - TEMP_NAME_EXTRA if last else NAME_MAX_BYTES
        size = len(part.encode("utf-8"))
        if size > limit:
            what, extra = ("file", len(suffix)) if last else ("folder", 0)
            raise DragInputError(
                f"save_name is too long: the {what} name {_shown(part)} is {size - extra} bytes (UTF-8); "
                f"at most {limit - extra} fit"
            )
    return name


def check_target(folder: str, root: Path, relative: str, overwrite: bool, reserved_folder: str | None = None) -> Path:
    """The path ``root/relative`` for writing, after the checks that need the disk.

    ``folder`` is the folder's name as users know it (``loras``). Refuses a
    path that resolves (through symlinks) outside ``root`` or into
    ``reserved_folder``, one too long for the OS, and an existing file unless
    ``overwrite``.
    """
    shown = f"{folder}/{relative}"
    path = root / relative
    temp = path.with_name(path.name + "x" * TEMP_NAME_EXTRA)
    if len(os.fsencode(os.path.abspath(temp))) > PATH_MAX_BYTES:
        raise DragInputError(f"save_name is too long: {_shown(shown)} would not fit in the longest path the OS accepts")
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if not _inside(real, real_root):
        raise DragInputError(f"{_shown(shown)} leads outside the {folder} folder (through a link); choose another name")
    if reserved_folder is not None and _inside(real, os.path.join(real_root, reserved_folder)):
        raise DragInputError(f"{_shown(shown)} leads into {folder}/{reserved_folder}/, which DragKit keeps for its own cache")
    if os.path.lexists(path):
        if os.path.isdir(path):
            raise DragInputError(f"{_shown(shown)} is a folder; choose another save_name")
        if not overwrite:
            raise DragInputError(f"{_shown(shown)} already exists; choose another save_name, or set overwrite to true to replace it")
    return path


def contained_path(path: str, roots: list[str]) -> str | None:
    """``path`` with symlinks resolved when it lies inside one of ``roots`` (also resolved), else ``None``."""
    real = os.path.realpath(path)
    return real if any(_inside(real, os.path.realpath(root)) for root in roots) else None


def without_path(message: str, path: str, shown: str) -> str:
    """``message`` with the server path ``path`` replaced by ``shown``, also where it is quoted by ``repr``
    (Windows paths appear there with doubled backslashes)."""
    return message.replace(repr(path), repr(shown)).replace(path, shown)


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives on Windows
        return False


def _shown(text: str, limit: int = 60) -> str:
    """``text`` quoted for a message, shortened in the middle when long."""
    if len(text) > limit:
        text = f"{text[: limit // 2]}...{text[-limit // 2 + 3:]}"
    return repr(text)
