"""LoRA Fine-tune in a real ComfyUI (in-process) on the tiny SD1.5 checkpoint.

The node class is taken from the in-process pack (``<pack>.nodes.lora``), not
from the registry, so these tests do not depend on the node being registered.
ε is compared at a probe (8x8 latent, t = 500, the training prompt).
Tolerances: the node's MODEL and LoraLoaderModelOnly on the saved file apply
the same float32 patches, so their ε agree to 1e-5 (measured 0); the shared
MODEL's ε after training equals its ε before exactly.
"""

import hashlib
import importlib

import pytest
import torch

pytestmark = pytest.mark.host

STEPS, RANK, ALPHA, LR, BATCH = 4, 4, 4.0, 2e-3, 2


@pytest.fixture(scope="module")
def lora_node(comfy_inproc):
    return importlib.import_module(comfy_inproc.module_name + ".nodes.lora")


@pytest.fixture(scope="module")
def inputs():
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(5)), {}]]
    return image, cond


def finetune(lora_node, models, inputs, **change):
    image, cond = inputs
    args = dict(model=models.model, vae=models.vae, image=image, positive=cond, steps=STEPS, rank=RANK, alpha=ALPHA,
                lr=LR, batch=BATCH, seed=0, save_name="", use_cache=True) | change
    with torch.inference_mode():
        return lora_node.LoRAFineTune().finetune(**args)


def eps_of(model, cond, t=500):
    """ε of a MODEL at a fixed probe latent."""
    import comfy.model_management as mm

    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        mm.load_models_gpu([model])
        ms = model.get_model_object("model_sampling")
        sigma = ms.sigma(torch.tensor([t]))
        x = z * (1 + sigma**2).sqrt()
        denoised = model.model.apply_model(x, sigma, c_crossattn=cond[0][0])
        return ((x - denoised) / sigma).float()


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def files(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def first_run(lora_node, tiny_comfy_models, inputs, loras_dir):
    model = tiny_comfy_models.model
    before = {"weights": weights_digest(model), "patches": repr(model.patches), "options": repr(model.model_options),
              "eps": eps_of(model, inputs[1])}
    trainings = lora_node.STATS["trainings"]
    out_model, name = finetune(lora_node, tiny_comfy_models, inputs, save_name="dragkit/cat")
    assert lora_node.STATS["trainings"] == trainings + 1
    after_weights = weights_digest(model)
    return before, after_weights, out_model, name


def test_trains_and_leaves_the_shared_model_unchanged(first_run, tiny_comfy_models, inputs):
    before, after_weights, out_model, name = first_run
    model = tiny_comfy_models.model
    assert name == "dragkit/cat.safetensors"
    assert out_model is not model and out_model.model is model.model
    assert after_weights == before["weights"]
    assert repr(model.patches) == before["patches"] and repr(model.model_options) == before["options"]
    assert len(out_model.patches) == 4 * 2 * 10  # to_q/k/v/out.0 of attn1 and attn2 in the tiny UNet's 10 transformer blocks
    eps_lora = eps_of(out_model, inputs[1])
    eps_again = eps_of(model, inputs[1])
    assert torch.equal(eps_again, before["eps"])  # no trainer wrapper or patch left on the shared model
    assert weights_digest(model) == before["weights"]
    change = float((eps_lora - before["eps"]).abs().mean() / before["eps"].abs().mean())
    assert change > 1e-4, change


def test_saved_file_loads_with_lora_loader_and_gives_the_same_eps(first_run, comfy_inproc, tiny_comfy_models, inputs, loras_dir):
    _, _, out_model, name = first_run
    assert (loras_dir / name).is_file()
    import safetensors.torch

    sd = safetensors.torch.load_file(str(loras_dir / name))
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha")) for k in sd)
    with torch.inference_mode():
        (loaded,) = comfy_inproc.nodes.LoraLoaderModelOnly().load_lora_model_only(tiny_comfy_models.model, name, 1.0)
    assert set(loaded.patches) == set(out_model.patches)
    eps_loader = eps_of(loaded, inputs[1])
    eps_node = eps_of(out_model, inputs[1])
    assert (eps_loader - eps_node).abs().max() < 1e-5


def test_cache_hit_does_not_train(first_run, lora_node, tiny_comfy_models, inputs, loras_dir, monkeypatch):
    _, _, out_model, _ = first_run
    trainings, hits = lora_node.STATS["trainings"], lora_node.STATS["cache_hits"]

    def no_trainer(*args, **kwargs):
        raise AssertionError("a cache hit must not build a trainer (no wrappers, no training load)")

    monkeypatch.setattr(lora_node, "ComfyLoRATrainer", no_trainer)
    cached_model, name = finetune(lora_node, tiny_comfy_models, inputs)
    assert lora_node.STATS["trainings"] == trainings and lora_node.STATS["cache_hits"] == hits + 1
    assert name.startswith("dragkit-lora-cache/") and (loras_dir / name).is_file()
    assert torch.equal(eps_of(cached_model, inputs[1]), eps_of(out_model, inputs[1]))


def test_changed_parameters_retrain_and_training_is_deterministic(first_run, lora_node, tiny_comfy_models, inputs, loras_dir):
    _, _, out_model, _ = first_run
    trainings = lora_node.STATS["trainings"]
    _, name_seed = finetune(lora_node, tiny_comfy_models, inputs, seed=1)
    _, name_steps = finetune(lora_node, tiny_comfy_models, inputs, steps=STEPS - 1)
    assert lora_node.STATS["trainings"] == trainings + 2
    assert len({name_seed, name_steps}) == 2
    # use_cache off: trains again with the first run's parameters, writes no cache file, same LoRA (CPU).
    cache_files = files(loras_dir)
    again, name = finetune(lora_node, tiny_comfy_models, inputs, use_cache=False)
    assert lora_node.STATS["trainings"] == trainings + 3 and name == ""
    assert files(loras_dir) == cache_files
    assert torch.equal(eps_of(again, inputs[1]), eps_of(out_model, inputs[1]))


def test_existing_lora_is_loaded_instead_of_training(first_run, lora_node, tiny_comfy_models, inputs):
    _, _, out_model, name = first_run
    trainings = lora_node.STATS["trainings"]
    loaded, returned = finetune(lora_node, tiny_comfy_models, inputs, existing_lora=name, seed=123)
    assert returned == name and lora_node.STATS["trainings"] == trainings
    assert torch.equal(eps_of(loaded, inputs[1]), eps_of(out_model, inputs[1]))


def test_interrupt_mid_training_leaves_no_file(lora_node, tiny_comfy_models, inputs, loras_dir, monkeypatch):
    import comfy.model_management as mm

    real = lora_node.progress_reporter

    def interrupting(total):
        report = real(total)

        def step(done):
            if done == 2:
                mm.interrupt_current_processing(True)
            report(done)

        return step

    monkeypatch.setattr(lora_node, "progress_reporter", interrupting)
    model = tiny_comfy_models.model
    eps_before = eps_of(model, inputs[1])
    before = files(loras_dir)
    trainings = lora_node.STATS["trainings"]
    try:
        with pytest.raises(mm.InterruptProcessingException):
            finetune(lora_node, tiny_comfy_models, inputs, seed=77, steps=6, save_name="interrupted")
    finally:
        mm.interrupt_current_processing(False)
    assert files(loras_dir) == before
    assert lora_node.STATS["trainings"] == trainings
    assert torch.equal(eps_of(model, inputs[1]), eps_before)


@pytest.mark.parametrize(
    "change, message",
    [({"image": torch.rand(2, 64, 64, 3)}, "one image"), ({"save_name": "../x"}, "save_name"),
     ({"positive": [[torch.randn(2, 77, 768), {}]]}, "batch of 2"), ({"existing_lora": "nope.safetensors"}, "not in")],
)
def test_errors_name_the_node(lora_node, tiny_comfy_models, inputs, loras_dir, change, message):
    with pytest.raises(ValueError, match=r"^\[LoRA Fine-tune\] .*" + message):
        finetune(lora_node, tiny_comfy_models, inputs, **change)
