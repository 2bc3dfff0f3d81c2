"""Run a real ComfyUI (from ``COMFYUI_PATH``) as the host of this pack: tests, runner, benchmark.

Two ways:

* **In-process** (:func:`load_pack_inproc`): ComfyUI's modules imported into the
  test process (``COMFYUI_PATH`` *first* on ``sys.path``, so ComfyUI's top-level
  ``nodes.py`` wins over this repo's ``nodes/`` package), CPU forced, built-in
  nodes initialised, and the pack loaded exactly the way ComfyUI loads it
  (``nodes.load_custom_node(<pack dir>)``: module name = the pack's path, so
  relative imports work). Tests reach the pack's modules as ``host.pack.nodes``
  / ``host.pack.dragkit`` -- the very module objects the registered nodes use
  (the top-level ``dragkit`` that pytest imports is a *different* copy).
* **Server** (:class:`ComfyServer`): ``python main.py --cpu ...`` in a
  throw-away base folder with the pack symlinked into ``custom_nodes/dragkit``
  and checkpoints symlinked into ``models/checkpoints``; talk HTTP to it.

Nothing here imports ComfyUI or pytest at module level.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Iterator

ENV_VAR = "COMFYUI_PATH"
PACK_FOLDER_NAME = "dragkit"
"""Folder name of the pack under ``custom_nodes`` in the server host (and its web/extension name)."""

SKIP_MESSAGE = (
    "no ComfyUI (COMFYUI_PATH unset or none): host tests need a ComfyUI checkout "
    "(scripts/test.sh gets one when COMFYUI_PATH is unset; or COMFYUI_PATH=/path/to/ComfyUI, with ComfyUI's "
    "requirements installed in this Python)"
)


def repo_root() -> Path:
    """The repository root, which is the pack itself (has ``__init__.py``)."""
    return Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Locating ComfyUI


def comfyui_path() -> Path | None:
    """``COMFYUI_PATH`` as an absolute Path, or None when unset, empty or ``none`` (not validated)."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value or value == "none":
        return None
    return Path(value).expanduser().resolve()


def comfyui_problem() -> str | None:
    """Why ``COMFYUI_PATH`` is unusable (a sentence), or None when it looks like a checkout."""
    path = comfyui_path()
    if path is None:
        return SKIP_MESSAGE
    missing = [name for name in ("main.py", "nodes.py", "folder_paths.py", "comfy") if not (path / name).exists()]
    if missing:
        return (
            f"COMFYUI_PATH={path} is not a ComfyUI checkout (missing {', '.join(missing)}): "
            "host tests need one"
        )
    return None


def comfyui_version(path: Path | None = None) -> str | None:
    path = path or comfyui_path()
    try:
        text = (path / "comfyui_version.py").read_text()
    except (OSError, TypeError):
        return None
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return None


# ----------------------------------------------------------------------------------------------
# In-process host


def prepare_comfy_imports(cpu: bool = True) -> Path:
    """Make ``import comfy`` / ``import nodes`` resolve to ComfyUI's checkout.

    Puts ``COMFYUI_PATH`` first on ``sys.path`` (before the repo root, whose
    ``nodes/`` package would otherwise shadow ComfyUI's ``nodes.py``), and sets
    ``comfy.cli_args.args.cpu`` before ``comfy.model_management`` is imported
    (otherwise it probes CUDA). Raises ``RuntimeError`` if ComfyUI is missing or
    a wrong ``nodes`` module was already imported. Returns the checkout path.
    """
    problem = comfyui_problem()
    if problem is not None:
        raise RuntimeError(problem)
    path = comfyui_path()
    # Leave the checkout as it is: no __pycache__ folders written into it
    # (existing byte-code is still read; compiling ComfyUI costs ~0.5 s).
    sys.dont_write_bytecode = True
    entry = str(path)
    sys.path[:] = [p for p in sys.path if _resolved(p) != entry]
    sys.path.insert(0, entry)

    for name, expected in (("nodes", path / "nodes.py"), ("comfy", path / "comfy"), ("utils", path / "utils")):
        module = sys.modules.get(name)
        if module is None:
            continue
        # comfy is a namespace package (no __init__.py): compare its __path__.
        where = [getattr(module, "__file__", None)] + list(getattr(module, "__path__", []) or [])
        if not any(w and Path(w).resolve() == expected for w in where):
            raise RuntimeError(
                f"a module named {name!r} from {where} was imported before ComfyUI's {expected}; "
                f"import ComfyUI in tests only through dragrun.comfy_host, and never this repo's "
                f"nodes/ package as top-level 'nodes' (use load_pack_inproc().pack.nodes)"
            )

    # ComfyUI's nodes.py puts <checkout>/comfy first on sys.path, after which
    # "import utils" would find comfy/utils.py instead of the <checkout>/utils
    # package (server.py needs utils.install_util). main.py avoids this by
    # importing utils.extra_config first; do the same.
    import utils.extra_config  # noqa: F401
    import utils.install_util  # noqa: F401

    utils_mod = sys.modules["utils"]
    if [Path(p).resolve() for p in getattr(utils_mod, "__path__", [])] != [path / "utils"]:
        raise RuntimeError(f"top-level 'utils' is {utils_mod!r}, not ComfyUI's {path / 'utils'} package")

    import comfy.options  # noqa: F401  (args stay at their defaults: args_parsing is False)
    from comfy.cli_args import args

    if cpu and "comfy.model_management" not in sys.modules:
        args.cpu = True
    return path


def _resolved(p: str) -> str:
    try:
        return str(Path(p or ".").resolve())
    except OSError:
        return p


class LogCapture(logging.Handler):
    """Collects log records (all loggers) while active; see :func:`capture_logs`."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, min_level: int = logging.DEBUG) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= min_level]

    def text(self, min_level: int = logging.DEBUG) -> str:
        return "\n".join(f"{logging.getLevelName(r.levelno)}: {r.getMessage()}" for r in self.records
                         if r.levelno >= min_level)


@contextlib.contextmanager
def capture_logs(level: int = logging.DEBUG) -> Iterator[LogCapture]:
    """Capture root-logger records at ``level`` and above (ComfyUI logs to the root logger).

    Lowers the root logger's level for the duration, so DEBUG messages such as
    ComfyUI's "clip unexpected" / "Leftover VAE keys" are seen.
    """
    root = logging.getLogger()
    handler = LogCapture()
    handler.setLevel(level)
    old_level = root.level
    effective = root.getEffectiveLevel()
    # Existing handlers keep seeing only what they saw before (no DEBUG flood on stderr).
    others = [(h, h.level) for h in root.handlers]
    for h, h_level in others:
        h.setLevel(max(h_level, effective))
    root.addHandler(handler)
    root.setLevel(min(effective, level))
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        for h, h_level in others:
            h.setLevel(h_level)


@dataclass
class InprocHost:
    """ComfyUI in the test process, with the pack loaded as ComfyUI loads it."""

    comfyui: Path
    nodes: ModuleType
    """ComfyUI's top-level ``nodes`` module (``NODE_CLASS_MAPPINGS`` etc.)."""
    pack: ModuleType
    """The pack's package as loaded by ComfyUI (``pack.nodes``, ``pack.dragkit``, ...)."""
    pack_dir: Path
    module_name: str
    """``sys.modules`` key of the pack (its path, ``.`` replaced by ``_x_``)."""
    work_dir: Path
    """Input/output/temp/user folders of the in-process ComfyUI live here."""
    builtin_import_failed: list[str] = field(default_factory=list)
    load_log: str = ""

    @property
    def node_ids(self) -> list[str]:
        """Node ids the pack declares in its ``NODE_CLASS_MAPPINGS``."""
        return list(getattr(self.pack, "NODE_CLASS_MAPPINGS", {}) or {})

    def node_class(self, node_id: str):
        return self.nodes.NODE_CLASS_MAPPINGS[node_id]

    def run_node(self, node_id: str, **inputs):
        """Call a V1 node's FUNCTION like the executor does (under ``torch.inference_mode``)."""
        import torch

        cls = self.node_class(node_id)
        with torch.inference_mode():
            return getattr(cls(), cls.FUNCTION)(**inputs)

    def load_checkpoint(self, path: os.PathLike | str) -> "LoadedCheckpoint":
        """``CheckpointLoaderSimple`` on ``path`` (see :func:`load_checkpoint_inproc`)."""
        return load_checkpoint_inproc(path)


@dataclass
class LoadedCheckpoint:
    """What ``CheckpointLoaderSimple`` returned, and ComfyUI's log while loading."""

    path: Path
    model: Any
    """MODEL (``comfy.model_patcher.ModelPatcher``); ``model.model`` is the BaseModel."""
    clip: Any
    vae: Any
    log: LogCapture


def load_checkpoint_inproc(path: os.PathLike | str) -> LoadedCheckpoint:
    """Load a checkpoint with ComfyUI's own ``CheckpointLoaderSimple`` in this process.

    The file's folder is registered as a ``checkpoints`` folder. ComfyUI's log
    records during the load are captured at DEBUG level (missing/unexpected keys).
    """
    import torch

    nodes = init_comfy_inproc()
    import folder_paths

    path = Path(path).resolve()
    folder_paths.add_model_folder_path("checkpoints", str(path.parent))
    with capture_logs(logging.DEBUG) as logs, torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(path.name)
    return LoadedCheckpoint(path=path, model=model, clip=clip, vae=vae, log=logs)


_INPROC: dict[str, InprocHost] = {}
_BUILTINS_FAILED: list[str] | None = None


def init_comfy_inproc(work_dir: os.PathLike | str | None = None, cpu: bool = True) -> ModuleType:
    """Import ComfyUI in-process (CPU) and initialise its built-in nodes once; returns ``nodes``.

    Input/output/temp/user folders are redirected to ``work_dir`` (a fresh temp
    folder by default) so nothing is written into the checkout.
    """
    global _BUILTINS_FAILED
    prepare_comfy_imports(cpu=cpu)
    import folder_paths
    import nodes

    if _BUILTINS_FAILED is None:
        if work_dir:
            work = Path(work_dir)
        else:
            work = Path(tempfile.mkdtemp(prefix="dragkit-comfy-inproc-"))
            atexit.register(shutil.rmtree, work, True)
        for sub in ("input", "output", "temp", "user"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        folder_paths.set_input_directory(str(work / "input"))
        folder_paths.set_output_directory(str(work / "output"))
        folder_paths.set_temp_directory(str(work / "temp"))
        folder_paths.set_user_directory(str(work / "user"))
        _BUILTINS_FAILED = list(
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)) or []
        )
    return nodes


def load_pack_inproc(pack_dir: os.PathLike | str | None = None,
                     work_dir: os.PathLike | str | None = None, cpu: bool = True) -> InprocHost:
    """Load the pack (default: this repo) into an in-process ComfyUI; cached per pack dir.

    Uses ``nodes.load_custom_node(str(pack_dir), ignore=<built-in ids>)`` like
    ComfyUI's start-up. Raises ``RuntimeError`` with ComfyUI's log (traceback
    included) when the pack fails to import.
    """
    pack_dir = Path(pack_dir or repo_root()).resolve()
    key = str(pack_dir)
    if key in _INPROC:
        return _INPROC[key]
    nodes = init_comfy_inproc(work_dir, cpu=cpu)
    import folder_paths

    builtin_ids = set(nodes.NODE_CLASS_MAPPINGS)
    with capture_logs(logging.INFO) as logs:
        ok = asyncio.run(nodes.load_custom_node(key, ignore=builtin_ids, module_parent="custom_nodes"))
    module_name = key.replace(".", "_x_")
    if not ok or module_name not in sys.modules:
        raise RuntimeError(f"ComfyUI could not load the pack {pack_dir}:\n{logs.text()}")
    host = InprocHost(
        comfyui=comfyui_path(),
        nodes=nodes,
        pack=sys.modules[module_name],
        pack_dir=pack_dir,
        module_name=module_name,
        work_dir=Path(folder_paths.get_output_directory()).parent,
        builtin_import_failed=list(_BUILTINS_FAILED or []),
        load_log=logs.text(),
    )
    _INPROC[key] = host
    return host


# ----------------------------------------------------------------------------------------------
# Server host


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServerError(AssertionError):
    """A failed request, prompt or start-up of the test server (message has the log tail)."""


class ComfyClient:
    """ComfyUI's HTTP API at ``url``: a server this process started (:class:`ComfyServer`) or one already running.

    Prompts are followed by polling ``/history/<id>``; inputs go up through
    ``/upload/image`` and outputs come back through ``/view``, so the server
    may be on another machine.
    """

    proc: subprocess.Popen | None = None
    """The server's process when this process started it (its exit ends a :meth:`wait` early)."""

    def __init__(self, url: str) -> None:
        self._url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex

    @property
    def url(self) -> str:
        return self._url

    def _fail(self, message: str) -> None:
        raise ComfyServerError(f"{message} ({self.url})")

    # -- HTTP -------------------------------------------------------------------------------

    def get(self, route: str, **kw):
        import requests

        kw.setdefault("timeout", 60)
        return requests.get(self.url + route, **kw)

    def post(self, route: str, **kw):
        import requests

        kw.setdefault("timeout", 60)
        return requests.post(self.url + route, **kw)

    def get_json(self, route: str) -> Any:
        r = self.get(route)
        if r.status_code != 200:
            self._fail(f"GET {route} -> {r.status_code}: {r.text[:2000]}")
        return r.json()

    def object_info(self, node_class: str | None = None) -> dict:
        """``GET /object_info`` (or ``/object_info/<class>``)."""
        return self.get_json("/object_info" + (f"/{node_class}" if node_class else ""))

    def queue_prompt(self, api_prompt: dict, extra_data: dict | None = None) -> str:
        """``POST /prompt`` with an API-format prompt; returns the prompt id.

        Raises :class:`ComfyServerError` (with ``node_errors``) on HTTP 400 or
        when the server accepted the prompt but reported node errors (ComfyUI
        then silently runs only the valid outputs).
        """
        body = {"prompt": api_prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        r = self.post("/prompt", json=body)
        try:
            data = r.json()
        except ValueError:
            data = {"error": r.text}
        if r.status_code != 200:
            self._fail(
                f"POST /prompt -> {r.status_code}: error={json.dumps(data.get('error'), indent=1)}\n"
                f"node_errors={json.dumps(data.get('node_errors'), indent=1)}"
            )
        if data.get("node_errors"):
            self._fail(f"POST /prompt accepted with node_errors={json.dumps(data['node_errors'], indent=1)}")
        return data["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.2) -> dict:
        """Poll ``/history/<id>`` until the prompt finished; returns its history entry.

        Raises :class:`ComfyServerError` with the node, exception message,
        traceback and log tail when execution failed, was interrupted, or timed
        out; a timed-out prompt is cancelled first (:meth:`cancel`), so a prompt
        queued next does not wait behind it.
        """
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "error" or not status.get("completed", True):
                    self._fail("prompt failed: " + _describe_status(status))
                if status.get("completed") or status.get("status_str") == "success":
                    return entry
            if self.proc is not None and self.proc.poll() is not None:
                self._fail(f"ComfyUI exited with code {self.proc.returncode} while running {prompt_id}")
            if time.monotonic() > deadline:
                self.cancel(prompt_id)
                self._fail(f"prompt {prompt_id} did not finish within {timeout:.0f} s (cancelled)")
            time.sleep(poll)

    def run(self, api_prompt: dict, timeout: float = 300.0) -> dict:
        """``queue_prompt`` + ``wait``."""
        return self.wait(self.queue_prompt(api_prompt), timeout=timeout)

    def upload_image(self, path: os.PathLike | str, subfolder: str = "", overwrite: bool = True,
                     kind: str = "input") -> str:
        """``POST /upload/image``; returns the name to give LoadImage (``subfolder/name``)."""
        path = Path(path)
        with open(path, "rb") as fh:
            r = self.post(
                "/upload/image",
                files={"image": (path.name, fh, "image/png")},
                data={"type": kind, "subfolder": subfolder, "overwrite": "true" if overwrite else "false"},
            )
        if r.status_code != 200:
            self._fail(f"POST /upload/image -> {r.status_code}: {r.text[:500]}")
        data = r.json()
        return f"{data['subfolder']}/{data['name']}" if data.get("subfolder") else data["name"]

    def interrupt(self) -> None:
        self.post("/interrupt")

    def cancel(self, prompt_id: str) -> None:
        """Remove ``prompt_id`` from the queue (``POST /queue`` delete), then interrupt it if it runs.

        In this order a prompt that leaves the queue between the two requests
        is still interrupted. ``/interrupt`` names the prompt, so another one
        running is left alone. Best effort: a request that fails is ignored
        (the caller is reporting the prompt's failure anyway).
        """
        import requests

        for route, body in (("/queue", {"delete": [prompt_id]}), ("/interrupt", {"prompt_id": prompt_id})):
            try:
                self.post(route, json=body, timeout=10)
            except requests.RequestException:
                pass

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self.post("/free", json={"unload_models": unload_models, "free_memory": free_memory})


    def output_items(self, history_entry: dict) -> list[dict]:
        """The ``{"filename", "subfolder", "type"}`` items of a finished prompt's ``ui`` outputs, saved images first.

        Items of type ``output`` (SaveImage) come first; previews (``temp``)
        only when nothing was saved.
        """
        items = [item for ui in (history_entry.get("outputs") or {}).values() for value in ui.values()
                 if isinstance(value, list) for item in value if isinstance(item, dict) and "filename" in item]
        saved = [item for item in items if (item.get("type") or "output") == "output"]
        return saved or items

    def download(self, item: dict) -> bytes:
        """``GET /view`` of one output item (see :meth:`output_items`): the file's bytes."""
        params = {"filename": item["filename"], "subfolder": item.get("subfolder") or "",
                  "type": item.get("type") or "output"}
        r = self.get("/view", params=params)
        if r.status_code != 200:
            self._fail(f"GET /view {params} -> {r.status_code}: {r.text[:500]}")
        return r.content


class ComfyServer(ComfyClient):
    """A headless ComfyUI server with this pack installed, as a context manager.

    ::

        with ComfyServer(checkpoints=[tiny_checkpoint_path()]) as server:
            pid = server.queue_prompt(api_prompt)
            entry = server.wait(pid)
            files = server.output_files(entry)

    Layout of the temporary base folder (``server.base``)::

        custom_nodes/dragkit -> <pack dir>     (symlink; a copy if symlinks fail)
        models/checkpoints/<name> -> <file>    (symlinks)
        models/controlnet/<name> -> <file>     (symlinks, from ``controlnets``)
        models/upscale_models/<name> -> <file> (symlinks, from ``upscale_models``)
        models/diffusion_models/, models/vae/, models/text_encoders/
                                               (symlinks, from the arguments of those names: UNETLoader,
                                               VAELoader, CLIPLoader / DualCLIPLoader)
        models/loras/                          (symlinks from ``loras``; LoRA Fine-tune writes its cache here)
        input/ output/ temp/ user/
        extra_model_paths.yaml                 (base_path + custom_nodes and the model folders)
        server.log                             (stdout + stderr)

    Started as ``python main.py [--cpu] --listen 127.0.0.1 --port P
    --disable-auto-launch --base-directory B --extra-model-paths-config Y
    --output-directory ... --input-directory ... --temp-directory ...
    --user-directory ... --database-url sqlite:///:memory:`` from ``COMFYUI_PATH``
    with the current interpreter. ``--base-directory`` keeps the checkout's own
    ``custom_nodes``/``models`` out of the test and nothing is written into it.
    """

    def __init__(
        self,
        checkpoints: Iterable[os.PathLike | str] = (),
        controlnets: Iterable[os.PathLike | str] = (),
        upscale_models: Iterable[os.PathLike | str] = (),
        diffusion_models: Iterable[os.PathLike | str] = (),
        vae: Iterable[os.PathLike | str] = (),
        text_encoders: Iterable[os.PathLike | str] = (),
        loras: Iterable[os.PathLike | str] = (),
        pack_dir: os.PathLike | str | None = None,
        pack_name: str = PACK_FOLDER_NAME,
        extra_args: Iterable[str] = (),
        startup_timeout: float = 120.0,
        comfyui: os.PathLike | str | None = None,
        python: str | None = None,
        keep_dir: bool | None = None,
        env: dict[str, str] | None = None,
        cpu: bool = True,
        die_with_parent: bool = False,
    ) -> None:
        self.comfyui = Path(comfyui).resolve() if comfyui else comfyui_path()
        if self.comfyui is None:
            raise RuntimeError(SKIP_MESSAGE)
        self.models: dict[str, list[Path]] = {
            "checkpoints": [Path(p).resolve() for p in checkpoints],
            "controlnet": [Path(p).resolve() for p in controlnets],
            "upscale_models": [Path(p).resolve() for p in upscale_models],
            "diffusion_models": [Path(p).resolve() for p in diffusion_models],
            "vae": [Path(p).resolve() for p in vae],
            "text_encoders": [Path(p).resolve() for p in text_encoders],
            "loras": [Path(p).resolve() for p in loras],
        }
        """Model files per ComfyUI folder name, linked into ``models/<folder>/`` of the base folder."""
        self.pack_dir = Path(pack_dir or repo_root()).resolve()
        self.pack_name = pack_name
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.python = python or sys.executable
        self.keep_dir = bool(os.environ.get("DRAGKIT_KEEP_SERVER_DIR")) if keep_dir is None else keep_dir
        self.env = env
        self.cpu = cpu
        """Start ComfyUI with ``--cpu`` (tests, CPU machines); False lets it use the GPU."""
        self.die_with_parent = die_with_parent
        """Linux: ComfyUI gets SIGTERM when the thread that started it dies (a killed Ray actor leaves no server)."""
        self.base: Path | None = None
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self._log_file = None
        self.client_id = uuid.uuid4().hex

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.base / "server.log"

    def dir(self, kind: str) -> Path:
        """``input``, ``output``, ``temp``, ``user``, ``models`` or ``custom_nodes`` folder."""
        return self.base / kind

    def _make_base(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="dragkit-comfy-")).resolve()
        for sub in ("custom_nodes", "input", "output", "temp", "user", *(f"models/{f}" for f in self.models)):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / self.pack_name
        try:
            link.symlink_to(self.pack_dir, target_is_directory=True)
        except OSError:
            shutil.copytree(self.pack_dir, link, ignore=shutil.ignore_patterns(".git", "__pycache__", ".venv"))
        for folder, files in self.models.items():
            for file in files:
                target = self.base / "models" / folder / file.name
                try:
                    target.symlink_to(file)
                except OSError:
                    shutil.copy2(file, target)
        (self.base / "extra_model_paths.yaml").write_text(
            "dragkit_tests:\n"
            f"  base_path: {json.dumps(str(self.base))}\n"
            "  custom_nodes: custom_nodes\n"
            + "".join(f"  {folder}: models/{folder}\n" for folder in self.models)
        )

    def command(self) -> list[str]:
        b = self.base
        return [
            self.python, "main.py",
            *(["--cpu"] if self.cpu else []),
            "--listen", "127.0.0.1",
            "--port", str(self.port),
            "--disable-auto-launch",
            "--base-directory", str(b),
            "--extra-model-paths-config", str(b / "extra_model_paths.yaml"),
            "--output-directory", str(b / "output"),
            "--input-directory", str(b / "input"),
            "--temp-directory", str(b),  # ComfyUI appends "temp": the temp folder is b/temp
            "--user-directory", str(b / "user"),
            "--database-url", "sqlite:///:memory:",
            *self.frontend_args(),
            *self.extra_args,
        ]

    @staticmethod
    def frontend_args() -> list[str]:
        """``--front-end-root`` for ``DRAGKIT_FRONTEND_ROOT`` (a frontend package's ``static`` folder, e.g. a newer
        ``comfyui-frontend-package`` than the host pins); none when unset: the host's own frontend."""
        root = os.environ.get("DRAGKIT_FRONTEND_ROOT")
        if not root:
            return []
        if not (Path(root) / "index.html").is_file():
            raise RuntimeError(f"DRAGKIT_FRONTEND_ROOT={root} is not a frontend's static folder (no index.html)")
        return ["--front-end-root", str(Path(root).resolve())]

    def start(self) -> "ComfyServer":
        import requests

        self._make_base()
        self.port = free_port()
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONUNBUFFERED"] = "1"
        # Write no __pycache__ into the ComfyUI checkout (or the symlinked pack).
        env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
        self._log_file = open(self.log_path, "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(), cwd=self.comfyui, env=env,
            stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_terminate_with_parent if self.die_with_parent and sys.platform == "linux" else None,
        )
        deadline = t0 + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                self._fail(f"ComfyUI exited with code {self.proc.returncode} during start-up")
            try:
                r = requests.get(self.url + "/object_info", timeout=10)
                if r.status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self._fail(f"ComfyUI did not answer /object_info within {self.startup_timeout:.0f} s")
            time.sleep(0.25)
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.base is not None and not self.keep_dir:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- log --------------------------------------------------------------------------------

    def log_text(self) -> str:
        """Everything the server printed so far (stdout + stderr)."""
        try:
            return self.log_path.read_bytes().decode("utf-8", errors="replace")
        except (OSError, TypeError):
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _fail(self, message: str) -> None:
        raise ComfyServerError(f"{message}\n--- server log (tail) ---\n{self.log_tail()}")

    def output_files(self, history_entry: dict, node_id: str | None = None) -> list[Path]:
        """Files referenced by the ``ui`` outputs (images, gifs, ...) of a history entry.

        Entries like ``{"filename", "subfolder", "type": output|temp|input}`` are
        resolved to paths in this server's folders; ``node_id`` limits to one node.
        """
        files = []
        for nid, ui in (history_entry.get("outputs") or {}).items():
            if node_id is not None and str(nid) != str(node_id):
                continue
            for items in ui.values():
                if not isinstance(items, list):
                    continue
                for item in items:
                    if isinstance(item, dict) and "filename" in item:
                        kind = item.get("type") or "output"
                        files.append(self.base / kind / (item.get("subfolder") or "") / item["filename"])
        return files


def _terminate_with_parent() -> None:
    """In the child before ``exec``: ask Linux for SIGTERM when the parent dies (``prctl(PR_SET_PDEATHSIG)``)."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _describe_status(status: dict) -> str:
    parts = [f"status={status.get('status_str')!r}"]
    for msg in status.get("messages") or []:
        if not isinstance(msg, (list, tuple)) or len(msg) != 2:
            continue
        event, data = msg
        if event == "execution_error":
            tb = "".join(data.get("traceback") or [])
            parts.append(
                f"node {data.get('node_id')} ({data.get('node_type')}): "
                f"{data.get('exception_type')}: {data.get('exception_message')}\n{tb}"
            )
        elif event == "execution_interrupted":
            parts.append(f"interrupted at node {data.get('node_id')} ({data.get('node_type')})")
    return "\n".join(parts)


def image_bytes_png(array) -> bytes:
    """PNG bytes of an HxWx3 (or HxWx4) uint8 array (for uploads)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
