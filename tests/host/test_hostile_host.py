"""Issue 15, hostile input in a real ComfyUI (in-process): names are refused before any work, messages name the
node and what is wrong, and never show an absolute server path.
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import os
import uuid

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.host

LORA = "[LoRA Fine-tune] "
LONGEST = 205
"""Longest save_name (without .safetensors) whose temporary file name still fits 255 bytes."""


@pytest.fixture(scope="module")
def lora_node(comfy_inproc):
    return importlib.import_module(comfy_inproc.module_name + ".nodes.lora")


@pytest.fixture
def loras_dir(comfy_inproc, tmp_path):
    """A fresh loras folder, first in ComfyUI's list (where the node writes)."""
    import folder_paths

    path = tmp_path / "loras"
    path.mkdir()
    folder_paths.add_model_folder_path("loras", str(path), is_default=True)
    yield path
    folder_paths.folder_names_and_paths["loras"][0].remove(str(path))


def no_server_path(message: str, *paths) -> None:
    import folder_paths

    for path in (folder_paths.base_path, folder_paths.models_dir, *map(str, paths)):
        assert str(path) not in message, f"the message shows the server path {path}: {message}"


def finetune(lora_node, models, **change):
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(5)), {}]]
    args = dict(model=models.model, vae=models.vae, image=image, positive=cond, steps=2, rank=2, alpha=2.0, lr=1e-3,
                batch=1, seed=0, save_name="", use_cache=False) | change
    with torch.inference_mode():
        return lora_node.LoRAFineTune().finetune(**args)


BAD_NAMES = [
    ("x" * 10_000, f"too long: the file name .* is 10000 bytes .*at most {LONGEST} fit"),
    ("x" * (LONGEST + 1), f"too long: the file name .* is {LONGEST + 1} bytes"),
    ("é" * 103, f"is 206 bytes .*at most {LONGEST} fit"),
    (("d" * 256) + "/x", "too long: the folder name .* is 256 bytes"),
    ("a\x00b", r"control or invalid characters \(U\+0000\)"),
    ("line\nbreak", r"control or invalid characters \(U\+000A\)"),
    ("CON", "'CON.safetensors' is a reserved device name on Windows"),
    ("aux", "'aux.safetensors' is a reserved device name on Windows"),
    ("sub/com1.v2", "is a reserved device name on Windows"),
    ("a:b", ": , which Windows refuses|holds :, which Windows refuses"),
    ("a\\b", r"holds \\, which Windows refuses"),
    ("../x", r"empty, '\.' or '\.\.' folder"),
    ("sub/../../x", r"'\.\.' folder"),
    ("a//b", "empty"),
    ("/etc/x", "is an absolute path"),
    ("dragkit-lora-cache/0123", "DragKit keeps for its own cache"),
    ("DragKit-LoRA-Cache/0123", "DragKit keeps for its own cache"),
    ("folder./x", "the name 'folder.' ends in a dot or space"),
    ("folder /x", "ends in a dot or space"),
]


@pytest.mark.parametrize("name, message", BAD_NAMES, ids=[f"bad{i}" for i in range(len(BAD_NAMES))])
def test_validate_inputs_refuses_bad_save_names(lora_node, loras_dir, name, message):
    result = lora_node.LoRAFineTune.VALIDATE_INPUTS(save_name=name)
    assert isinstance(result, str) and result.startswith(LORA), result
    assert __import__("re").search(message, result), result
    assert len(result) < 400
    no_server_path(result, loras_dir)


@pytest.mark.parametrize("name", ["my_edit", "sub/my_edit.safetensors", "x" * LONGEST, "é" * 102, "Caché 2", "CONSOLE", "a.b.c"])
def test_validate_inputs_accepts_good_save_names(lora_node, name):
    assert lora_node.LoRAFineTune.VALIDATE_INPUTS(save_name=name) is True


def test_the_longest_accepted_name_is_written_and_one_more_would_fail(comfy_inproc, loras_dir):
    """The length limit is the real one: dragkit.atomic's temporary name fits at LONGEST and not at LONGEST + 1."""
    atomic = importlib.import_module(comfy_inproc.module_name + ".dragkit.atomic")
    atomic.save_safetensors_atomic({"w": torch.zeros(1)}, loras_dir / ("x" * LONGEST + ".safetensors"))
    assert (loras_dir / ("x" * LONGEST + ".safetensors")).is_file()
    with pytest.raises(OSError) as err:
        atomic.save_safetensors_atomic({"w": torch.zeros(1)}, loras_dir / ("y" * (LONGEST + 1) + ".safetensors"))
    assert err.value.errno == errno.ENAMETOOLONG


def test_comfyui_validation_calls_validate_inputs_with_the_save_name(comfy_inproc, lora_node):
    """An API prompt with a NUL in save_name fails ComfyUI's validation, before anything executes."""
    import execution

    prompt = {"1": {"class_type": "DragKitLoRAFineTune", "inputs": {
        "model": ["9", 0], "vae": ["9", 2], "image": ["9", 0], "positive": ["9", 0], "steps": 2, "rank": 2,
        "alpha": 2.0, "lr": 1e-3, "batch": 1, "seed": 0, "save_name": "a\x00b", "use_cache": True, "overwrite": False,
    }}, "9": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "none.safetensors"}}}
    ok, errors, _ = asyncio.run(execution.validate_inputs("p1", prompt, "1", {}))
    assert not ok
    custom = [e for e in errors if e["type"] == "custom_validation_failed"]
    assert custom and "[LoRA Fine-tune] save_name" in custom[0]["details"] and "U+0000" in custom[0]["details"]


@pytest.mark.parametrize("name, message", [("x" * 10_000, "too long"), ("a\x00b", r"U\+0000"), ("con", "reserved"),
                                           ("dragkit-lora-cache/k", "own cache")])
def test_the_node_refuses_a_linked_bad_save_name_before_training(lora_node, tiny_comfy_models, loras_dir, monkeypatch,
                                                                 name, message):
    """A save_name from a link skips VALIDATE_INPUTS; the node refuses it before fingerprints or training."""
    def no_work(*args, **kwargs):
        raise AssertionError("a bad save_name must be refused before any work")

    monkeypatch.setattr(lora_node, "ComfyLoRATrainer", no_work)
    monkeypatch.setattr(lora_node, "pixel_digest", no_work)
    trainings = lora_node.STATS["trainings"]
    with pytest.raises(ValueError, match=r"^\[LoRA Fine-tune\] .*" + message) as err:
        finetune(lora_node, tiny_comfy_models, save_name=name, use_cache=True)
    assert lora_node.STATS["trainings"] == trainings
    assert list(loras_dir.iterdir()) == []
    no_server_path(str(err.value), loras_dir)


def test_an_existing_file_is_refused_unless_overwrite(lora_node, tiny_comfy_models, loras_dir, monkeypatch):
    (loras_dir / "sub").mkdir()
    taken = loras_dir / "sub" / "taken.safetensors"
    taken.write_bytes(b"the user's own LoRA")
    trainings = lora_node.STATS["trainings"]
    with pytest.raises(ValueError, match=r"^\[LoRA Fine-tune\] 'loras/sub/taken\.safetensors' already exists; .*overwrite") as err:
        finetune(lora_node, tiny_comfy_models, save_name="sub/taken")
    assert lora_node.STATS["trainings"] == trainings and taken.read_bytes() == b"the user's own LoRA"
    no_server_path(str(err.value), loras_dir)
    _, name = finetune(lora_node, tiny_comfy_models, save_name="sub/taken", overwrite=True)
    assert name == "sub/taken.safetensors" and lora_node.STATS["trainings"] == trainings + 1
    assert taken.read_bytes() != b"the user's own LoRA"


def test_links_out_of_the_loras_folder_or_into_the_cache_are_refused(lora_node, tiny_comfy_models, loras_dir, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (loras_dir / "out").symlink_to(outside, target_is_directory=True)
    (loras_dir / lora_node.CACHE_FOLDER).mkdir()
    (loras_dir / "c").symlink_to(loras_dir / lora_node.CACHE_FOLDER, target_is_directory=True)
    trainings = lora_node.STATS["trainings"]
    for name, message in [("out/x", "'loras/out/x.safetensors' leads outside the loras folder"),
                          ("c/x", r"'loras/c/x\.safetensors' leads into loras/dragkit-lora-cache/")]:
        with pytest.raises(ValueError, match=r"^\[LoRA Fine-tune\] " + message) as err:
            finetune(lora_node, tiny_comfy_models, save_name=name)
        no_server_path(str(err.value), loras_dir, tmp_path)
    assert lora_node.STATS["trainings"] == trainings and list(outside.iterdir()) == []


@pytest.mark.parametrize("depth", [5000, 200_000])
def test_drag_points_json_nested_too_deeply(comfy_inproc, depth):
    with pytest.raises(ValueError, match=r"^\[Drag Points \(JSON\)\] the points JSON is nested too deeply"):
        comfy_inproc.run_node("DragKitPointsFromJSON", points_json="[" * depth + "]" * depth)


def test_two_prompts_are_named_not_a_batch_of_two(comfy_inproc, tiny_comfy_models):
    one = [[torch.randn(1, 77, 768), {}]]
    (combined,) = comfy_inproc.run_node("ConditioningCombine", conditioning_1=one, conditioning_2=one)
    latent = {"samples": torch.randn(1, 4, 8, 8)}
    with pytest.raises(ValueError, match=r"^\[DDIM Invert\] the positive conditioning holds two prompts .*Combine"):
        comfy_inproc.run_node("DragKitDDIMInvert", model=tiny_comfy_models.model, latent=latent, positive=combined,
                              steps=10, strength=0.7, cache_layers="none", cache_device="auto")


def test_gooddrag_refuses_drag_steps_that_leave_nothing_to_sample(comfy_inproc, tiny_comfy_models, monkeypatch):
    optimize = comfy_inproc.pack.nodes.optimize
    positive = [[torch.randn(1, 77, 768), {}]]
    latent = {"samples": torch.randn(1, 4, 8, 8)}
    z_t, cache = comfy_inproc.run_node("DragKitDDIMInvert", model=tiny_comfy_models.model, latent=latent,
                                       positive=positive, steps=10, strength=0.5, cache_layers="none", cache_device="auto")
    points = comfy_inproc.pack.dragkit.points.parse_drag_points('{"points": [[16, 24], [48, 24]]}', 64, 64)

    def no_work(*args, **kwargs):
        raise AssertionError("drag_steps must be refused before any work")

    monkeypatch.setattr(optimize, "good_drag", no_work)
    for drag_steps in (5, 100):
        with pytest.raises(ValueError, match=r"^\[Motion-Supervision Optimize\] gooddrag: drag_steps=%d reaches the end "
                                             r"of the schedule: the latent is 5 of 10 steps from clean .*at most 4" % drag_steps):
            with torch.inference_mode():
                optimize.MotionSupervisionOptimize().optimize(
                    tiny_comfy_models.model, z_t, cache, positive, points, "gooddrag", 1, -1, -1, -1, -1,
                    drag_steps=drag_steps, drags_per_step=1, grad_steps=1)


def test_editor_does_not_follow_a_link_out_of_input(comfy_inproc, tmp_path):
    import folder_paths

    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    link = f"hostile_{uuid.uuid4().hex[:8]}.png"
    os.symlink(secret, os.path.join(folder_paths.get_input_directory(), link))
    with pytest.raises(ValueError, match=r"^\[Drag Points Editor\] the image file .* is outside ComfyUI's input") as err:
        comfy_inproc.run_node("DragKitPointsEditor", image_file=link, editor_state="", unique_id="1")
    no_server_path(str(err.value), tmp_path)


def test_editor_unreadable_image_message_names_the_file_not_its_server_path(comfy_inproc):
    import folder_paths

    name = f"hostile_{uuid.uuid4().hex[:8]}.png"
    with open(os.path.join(folder_paths.get_input_directory(), name), "wb") as fh:
        fh.write(b"not an image")
    with pytest.raises(ValueError, match=rf"^\[Drag Points Editor\] cannot read the image file '{name}': cannot identify") as err:
        comfy_inproc.run_node("DragKitPointsEditor", image_file=name, editor_state="", unique_id="1")
    no_server_path(str(err.value), folder_paths.get_input_directory())


@pytest.mark.parametrize("cut", [None, -3], ids=["not-safetensors", "truncated"])
def test_an_unreadable_existing_lora_is_named_inside_the_loras_folder(lora_node, tiny_comfy_models, loras_dir, cut):
    import safetensors.torch

    content = b"not a LoRA" if cut is None else safetensors.torch.save({"w": torch.zeros(4)})[:cut]
    (loras_dir / "sub").mkdir()
    (loras_dir / "sub" / "broken.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match=r"^\[LoRA Fine-tune\] cannot read loras/sub/broken\.safetensors as a LoRA file "
                                         r"\(.+\); replace or delete it$") as err:
        finetune(lora_node, tiny_comfy_models, existing_lora="sub/broken.safetensors")
    assert "\n" not in str(err.value)
    no_server_path(str(err.value), loras_dir)


def test_an_unreadable_cache_file_is_named_inside_the_loras_folder(lora_node, tiny_comfy_models, loras_dir, monkeypatch):
    monkeypatch.setattr(lora_node, "cache_key", lambda parts: "0" * 64)
    cache = loras_dir / lora_node.CACHE_FOLDER
    cache.mkdir()
    (cache / ("0" * 32 + ".safetensors")).write_bytes(b"\xff" * 64)
    trainings = lora_node.STATS["trainings"]
    with pytest.raises(ValueError, match=r"^\[LoRA Fine-tune\] cannot read loras/dragkit-lora-cache/0{32}\.safetensors "
                                         r"as a LoRA file") as err:
        finetune(lora_node, tiny_comfy_models, use_cache=True)
    assert lora_node.STATS["trainings"] == trainings
    no_server_path(str(err.value), loras_dir)


def test_server_paths_are_removed_also_where_repr_doubles_backslashes(comfy_inproc):
    file_names = importlib.import_module(comfy_inproc.module_name + ".nodes.file_names")
    path = "C:\\ComfyUI\\input\\a.png"
    message = f"cannot identify image file {path!r}; {path}"
    assert file_names.without_path(message, path, "a.png") == "cannot identify image file 'a.png'; a.png"
