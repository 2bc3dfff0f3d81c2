"""``--server URL``: ComfyUI servers that are already running, checked before a batch is handed to them.

A server is reached through ComfyUI's own HTTP API only
(:class:`dragrun.comfy_host.ComfyClient`), so it may run on another machine.
Before anything runs, every server must answer ``/object_info``, know every
node class of the workflow (the DragKit pack installed) and list every model
file the filled-in prompt names in its loaders' model lists. ComfyUI has no
route to upload a model: a missing one is named, with the server, and the
run is refused.
"""

from __future__ import annotations

from dragkit.errors import DragInputError

from .comfy_host import ComfyClient

REACH_TIMEOUT = 15.0
"""Seconds a server may take to answer its first ``/object_info``."""


def connect(urls: list[str]) -> list[tuple[ComfyClient, dict]]:
    """A client and its ``/object_info`` for each URL; :class:`DragInputError` naming every server that does not answer."""
    import requests

    found, problems = [], []
    for url in urls:
        if not url.startswith(("http://", "https://")):
            url = "http://" + url
        client = ComfyClient(url)
        try:
            response = client.get("/object_info", timeout=REACH_TIMEOUT)
            response.raise_for_status()
            found.append((client, response.json()))
        except (requests.RequestException, ValueError) as error:
            problems.append(f"--server {url}: no ComfyUI answers there ({type(error).__name__}: {error})")
    if problems:
        raise DragInputError("\n".join(problems))
    return found


def combo_options(spec: object) -> list | None:
    """The options of a combo input from its ``/object_info`` spec (both the old ``[[...], {}]`` form and
    ``["COMBO", {"options": [...]}]``); None for any other input."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return None
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        return list(spec[1].get("options") or [])
    return None


def is_model_input(name: str) -> bool:
    """Whether a loader input names a model file (``ckpt_name``, ``control_net_name``, ``clip_name1``, ...)."""
    return name.rstrip("0123456789").endswith("_name")


def missing_on(prompt: dict, object_info: dict) -> list[str]:
    """What server ``object_info`` lacks to run the API ``prompt``: node classes, then model files, one line each."""
    classes = sorted({node["class_type"] for node in prompt.values()} - set(object_info))
    lines = [f"node classes {', '.join(classes)} (is the DragKit pack installed there?)"] if classes else []
    for node in prompt.values():
        info = object_info.get(node["class_type"])
        if info is None:
            continue
        specs = {**(info.get("input") or {}).get("required", {}), **(info.get("input") or {}).get("optional", {})}
        for name, value in node["inputs"].items():
            options = combo_options(specs.get(name))
            if isinstance(value, str) and is_model_input(name) and options is not None and value not in options:
                lines.append(f"model {value!r} ({node['class_type']}.{name})")
    return sorted(set(lines), key=lines.index)


def check_servers(servers: list[tuple[ComfyClient, dict]], prompt: dict) -> None:
    """Refuse (:class:`DragInputError`) unless every server can run ``prompt`` (filled in): names what is missing where."""
    problems = [f"{client.url} lacks {line}" for client, info in servers for line in missing_on(prompt, info)]
    if problems:
        raise DragInputError(
            "not every --server can run this workflow (ComfyUI cannot receive model files: put them into the "
            "server's models folders, or install the pack, and restart it):\n  " + "\n  ".join(problems)
        )
