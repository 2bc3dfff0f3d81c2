"""The evaluator's metrics: DAI on constructed images, MD's matching, DIFT and LPIPS on tiny random weights."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dragkit.errors import DragInputError
from dragkit.metrics import DAI_PAPER, DAI_RELEASED, MetricUnavailable, dai, dai_pair_sums, match_points, mean_distance, patch
from dragkit.metrics.dift import DIFT_SEED, DIFTFeaturizer, load_dift
from dragkit.metrics.images import to_model_input
from dragkit.metrics.lpips import LPIPS, RELU_INDICES, alexnet_features, image_fidelity, load_lpips
from dragkit.metrics.matching import upsampled_at
from tools.tiny_models import micro_unet, micro_vae

# ----------------------------------------------------------------------------------------------
# DAI


def flat(value: float, size=(40, 50)) -> np.ndarray:
    return np.full((*size, 3), value, dtype=np.float32)


def test_patch_is_rows_then_columns_around_x_y_with_edge_replication():
    image = np.zeros((6, 7, 3), dtype=np.uint8)
    image[..., 0] = np.arange(7)[None, :]  # red = column (x)
    image[..., 1] = np.arange(6)[:, None]  # green = row (y)
    p = patch(image, (3, 2), 1) * 255
    assert p.shape == (3, 3, 3)
    assert p[..., 0].tolist() == [[2, 3, 4]] * 3 and p[..., 1].tolist() == [[1] * 3, [2] * 3, [3] * 3]
    corner = patch(image, (0, 5), 2) * 255  # x = 0, y = 5: clamped to the last row and first column
    assert corner[..., 0].tolist() == [[0, 0, 0, 1, 2]] * 5
    assert corner[..., 1].tolist() == [[3] * 5, [4] * 5, [5] * 5, [5] * 5, [5] * 5]
    assert torch.equal(patch(image, (2.6, 1.4), 0), patch(image, (3, 1), 0))


def test_dai_one_pair_equals_the_hand_computed_value_in_both_normalisations():
    source, result = flat(0.2), flat(0.2)
    result[18:23, 28:33] = 0.7  # a 5x5 block around the target (30, 20)
    out = dai(source, result, [(10, 10)], [(30, 20)], gammas=(1, 2, 5))
    # γ=1, 2: the whole patch differs by 0.5 in 3 channels -> S = (2γ+1)² · 3 · 0.25; / (2γ+1)² = 0.75
    assert out[DAI_PAPER][1] == pytest.approx(0.75) and out[DAI_PAPER][2] == pytest.approx(0.75)
    # γ=5: 25 of the 121 pixels differ
    assert out[DAI_PAPER][5] == pytest.approx(25 * 3 * 0.25 / 121)
    assert out[DAI_RELEASED] == pytest.approx(out[DAI_PAPER])  # one pair: the two agree


def test_dai_two_pairs_divides_by_the_pairs_once_or_twice():
    source = flat(0.0)
    result = flat(0.0)
    result[9:12, 9:12] = 1.0  # pair 1: target (10, 10) sees a white 3x3 block, the source handle black
    handles, targets = [(40, 30), (5, 35)], [(10, 10), (40, 20)]  # pair 2: black on black
    sums = dai_pair_sums(source, result, handles, targets, 1)
    assert sums.tolist() == [27.0, 0.0]  # 9 pixels x 3 channels x 1²
    out = dai(source, result, handles, targets, gammas=(1, 10))
    assert out[DAI_PAPER][1] == pytest.approx(27 / 9 / 2)
    assert out[DAI_RELEASED][1] == pytest.approx(27 / 9 / 2 / 2)
    assert out[DAI_PAPER][10] == pytest.approx(27 / 441 / 2)
    assert out[DAI_RELEASED][10] == pytest.approx(27 / 441 / 4)


def test_dai_reads_uint8_as_the_released_code_does():
    source = np.zeros((20, 20, 3), dtype=np.uint8)
    result = np.full((20, 20, 3), 255, dtype=np.uint8)
    assert dai(source, result, [(5, 5)], [(10, 10)], gammas=(1,))[DAI_PAPER][1] == pytest.approx(3.0)
    assert dai(source, source, [(5, 5)], [(10, 10)])[DAI_PAPER] == {1: 0.0, 5: 0.0, 10: 0.0, 20: 0.0}


def test_dai_refuses_mismatched_sizes_and_outside_points():
    with pytest.raises(DragInputError, match="resize the result"):
        dai(flat(0.0), flat(0.0, (41, 50)), [(1, 1)], [(2, 2)])
    with pytest.raises(DragInputError, match="outside"):
        dai(flat(0.0), flat(0.0), [(50, 1)], [(2, 2)])
    with pytest.raises(DragInputError, match="at least one pair"):
        dai(flat(0.0), flat(0.0), [], [])


# ----------------------------------------------------------------------------------------------
# MD matching


def test_grid_sampling_equals_full_bilinear_upsampling():
    features = torch.randn(5, 6, 9)
    full = F.interpolate(features[None], size=(37, 53), mode="bilinear", align_corners=False)[0]
    rows, cols = torch.arange(37), torch.arange(53)
    assert torch.allclose(upsampled_at(features, rows, cols, 53, 37), full, atol=1e-5)


def test_planted_correspondence_at_full_resolution():
    gen = torch.Generator().manual_seed(0)
    source = torch.randn(16, 24, 32, generator=gen)
    result = torch.randn(16, 24, 32, generator=gen)
    handles = [(3, 4), (20, 10)]
    planted = [[25, 17], [7, 2]]
    for (hx, hy), (px, py) in zip(handles, planted):
        result[:, py, px] = 2.5 * source[:, hy, hx]  # same direction, other length: cosine 1
    matched = match_points(source, result, handles, (24, 32), rows_per_block=5)
    assert matched.tolist() == planted
    targets = [(25, 20), (7, 2)]
    distances, _ = mean_distance(source, result, handles, targets, (24, 32))
    assert distances.tolist() == [3.0, 0.0]
    assert float(distances.mean()) == 1.5


def test_planted_correspondence_at_stride_8_maps_to_pixels():
    """Features at 1/8 resolution: a planted cell is found at the pixel where upsampling reproduces it exactly."""
    gen = torch.Generator().manual_seed(1)
    source = torch.randn(64, 6, 6, generator=gen)
    result = torch.randn(64, 6, 6, generator=gen)
    # Pixel (x, y) = (8c + 3.5, ...) lies on cell centre c; integer pixels 8c+3 and 8c+4 are 1/16 cell away.
    # Source handle at pixel (11, 19) ≈ cell (1, 2); plant that cell's vector into result cell (4, 3).
    vector = upsampled_at(source, torch.tensor([19]), torch.tensor([11]), 48, 48)[:, 0, 0]
    result[:, 3, 4] = vector * 3
    matched = match_points(source, result, [(11, 19)], (48, 48))
    x, y = matched[0].tolist()
    assert abs(x - (8 * 4 + 3.5)) <= 1 and abs(y - (8 * 3 + 3.5)) <= 1
    distances, _ = mean_distance(source, result, [(11, 19)], [(x, y + 3)], (48, 48))
    assert distances.tolist() == [3.0]


def test_identical_features_match_every_handle_to_itself():
    features = torch.randn(12, 10, 14, generator=torch.Generator().manual_seed(2))
    handles = [(0, 0), (13, 9), (6, 4)]
    assert match_points(features, features.clone(), handles, (10, 14)).tolist() == [list(h) for h in handles]


def test_matching_refuses_bad_input():
    f = torch.randn(4, 5, 5)
    with pytest.raises(DragInputError, match="channels"):
        match_points(f, torch.randn(3, 5, 5), [(1, 1)], (5, 5))
    with pytest.raises(DragInputError, match="outside"):
        match_points(f, f, [(5, 1)], (5, 5))
    with pytest.raises(DragInputError, match="NaN"):
        match_points(f, torch.full((4, 5, 5), math.nan), [(1, 1)], (5, 5))


# ----------------------------------------------------------------------------------------------
# DIFT on a tiny diffusers UNet and VAE


@pytest.fixture(scope="module")
def dift_folder(tmp_path_factory):
    """A diffusers model folder (unet/, vae/, scheduler/) with the micro test models, and a prompt embedding file."""
    import safetensors.torch
    from diffusers import DDIMScheduler

    folder = tmp_path_factory.mktemp("dift")
    micro_unet(3).save_pretrained(folder / "unet")
    micro_vae(4).save_pretrained(folder / "vae")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(folder / "scheduler")
    embeds = folder / "prompt.safetensors"
    safetensors.torch.save_file({"prompt_embeds": torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(5))}, embeds)
    return folder, embeds


def test_dift_features_follow_the_protocol(dift_folder):
    folder, embeds = dift_folder
    dift = load_dift(folder, prompt_embeds=embeds)
    assert (dift.timestep, dift.up_block, dift.ensemble) == (261, 1, 8)
    assert "fixed prompt embedding" in dift.prompt_note
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    features = dift.features(image)
    # micro UNet: up_blocks[1] is the last decoder block (32 channels at the latent's 4x6)
    assert features.shape == (32, 4, 6) and torch.isfinite(features).all()
    again = dift.features(image)
    assert torch.equal(features, again)  # seeded per call
    seen = []
    handle = dift.unet.up_blocks[1].register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    try:
        chunked = DIFTFeaturizer(dift.unet, dift.vae, dift.encode_prompt, dift.alphas, batch=3).features(image)
    finally:
        handle.remove()
    assert seen == [3, 3, 2] and torch.allclose(chunked, features, atol=1e-5)
    # Identical images: every handle matches itself, so MD is the handle-target distance.
    distances, matched = mean_distance(features, again, [(10, 20), (40, 5)], [(13, 24), (40, 5)], (32, 48))
    assert matched.tolist() == [[10, 20], [40, 5]] and distances.tolist() == [5.0, 0.0]


def sd_folder_with_text_encoder(source, folder, weights: bool = True):
    """``source``'s unet/, vae/, scheduler/ plus tokenizer/ and text_encoder/: a tiny CLIP with a letters-only vocabulary.

    ``weights=False`` leaves the text encoder's weights out (config.json only).
    """
    import json
    import shutil

    transformers = pytest.importorskip("transformers")
    for sub in ("unet", "vae", "scheduler"):
        shutil.copytree(source / sub, folder / sub)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{t: i + 2 for i, t in enumerate(letters + [c + "</w>" for c in letters])}}
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer(str(folder / "tokenizer" / "vocab.json"), str(folder / "tokenizer" / "merges.txt")).save_pretrained(folder / "tokenizer")
    config = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=77)
    if weights:
        torch.manual_seed(0)
        transformers.CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    else:
        config.save_pretrained(folder / "text_encoder")
    return folder


def test_dift_encodes_each_samples_prompt_with_the_folders_text_encoder(dift_folder, tmp_path):
    """A folder with tokenizer/ and text_encoder/ (a tiny CLIP with a letters-only vocabulary) encodes prompts."""
    folder = sd_folder_with_text_encoder(dift_folder[0], tmp_path / "sd")
    dift = load_dift(folder)
    assert dift.prompt_note is None
    assert dift.encode_prompt("a cat").shape == (1, 77, 32)
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert not torch.equal(dift.features(image, "a cat"), dift.features(image, "a dog"))


def test_dift_reports_what_is_missing(tmp_path, dift_folder):
    folder, embeds = dift_folder
    with pytest.raises(MetricUnavailable, match="does not exist"):
        load_dift(tmp_path / "nowhere")
    with pytest.raises(MetricUnavailable, match="unet/config.json"):
        load_dift(tmp_path, prompt_embeds=embeds)
    with pytest.raises(MetricUnavailable, match="text_encoder"):
        load_dift(folder)  # no text encoder and no fixed embedding


def test_dift_with_partial_or_corrupt_files_is_unavailable_naming_the_file(tmp_path, dift_folder):
    source, embeds = dift_folder
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"garbage garbage")
    with pytest.raises(MetricUnavailable, match=f"cannot load the prompt embedding file {junk}: SafetensorError"):
        load_dift(source, prompt_embeds=junk)
    folder = sd_folder_with_text_encoder(source, tmp_path / "sd", weights=False)
    with pytest.raises(MetricUnavailable, match=f"cannot load the text encoder from {folder / 'text_encoder'}: OSError"):
        load_dift(folder)  # config.json without weights
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / "tokenizer" / name).unlink(missing_ok=True)
    with pytest.raises(MetricUnavailable, match="no tokenizer/ folder with vocab.json"):
        load_dift(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(MetricUnavailable, match="cannot load the scheduler config"):
        load_dift(folder, prompt_embeds=embeds)
    [weights] = (folder / "unet").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(MetricUnavailable, match=f"cannot load the DIFT UNet from {folder / 'unet'}"):
        load_dift(folder, prompt_embeds=embeds)


def test_dift_feeds_the_unet_t261_noised_latents_and_keeps_up_block_1(tmp_path):
    """Hooks on a three-level UNet: the timestep, z_t = scheduler.add_noise(z0, ε) with the seeded draws, the kept block."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    vae = micro_vae(4)
    embeds = torch.randn(1, 5, 32)
    dift = DIFTFeaturizer(unet, vae, lambda prompt: embeds, batch=3)
    calls, kept, later = [], [], []
    hooks = [
        unet.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True),
        unet.up_blocks[1].register_forward_hook(lambda m, i, o: kept.append(o.clone())),
        unet.up_blocks[2].register_forward_hook(lambda m, i, o: later.append(o)),
    ]
    image = np.random.default_rng(3).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    try:
        features = dift.features(image, "ignored")
    finally:
        for hook in hooks:
            hook.remove()

    # The reference draws: one CPU generator seeded 42, posterior samples first, then the noise.
    gen = torch.Generator().manual_seed(DIFT_SEED)
    with torch.no_grad():
        posterior = vae.encode(to_model_input(image)).latent_dist
    shape = (8, *posterior.mean.shape[1:])
    draws, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    z0 = (posterior.mean + posterior.std * draws) * vae.config.scaling_factor
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    expected = scheduler.add_noise(z0, noise, torch.full((8,), 261))

    assert [args[0].shape[0] for args, _ in calls] == [3, 3, 2]
    assert torch.cat([args[1] for args, _ in calls]).tolist() == [261] * 8
    assert torch.allclose(torch.cat([args[0] for args, _ in calls]), expected, atol=1e-5)
    assert all(torch.equal(kwargs["encoder_hidden_states"], embeds.expand(len(args[0]), -1, -1)) for args, kwargs in calls)
    assert later == []  # the UNet stops after up_blocks[1]
    assert features.shape == kept[0].shape[1:] == (32, 8, 12)  # back at the latent's 1/8 size after two up-samplings
    assert torch.allclose(features, torch.cat(kept).mean(0), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# LPIPS / IF


def random_lpips_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """An LPIPS state dict in the lpips package's keys, random (non-negative linear layers as trained ones)."""
    gen = torch.Generator().manual_seed(seed)
    model = LPIPS()
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("features."):
            index, param = key.split(".")[1:]
            slice_no = (0, 3, 6, 8, 10).index(int(index)) + 1
            state[f"net.slice{slice_no}.{index}.{param}"] = torch.randn(value.shape, generator=gen) * 0.05
        elif key.startswith("lins."):
            state[f"lin{key.split('.')[1]}.model.1.weight"] = torch.rand(value.shape, generator=gen)
    return state


def test_lpips_from_one_file_and_from_the_two_package_files(tmp_path):
    state = random_lpips_state()
    torch.save(state, tmp_path / "lpips_alex.pth")
    one = load_lpips(tmp_path / "lpips_alex.pth")
    folder = tmp_path / "lpips"
    folder.mkdir()
    torch.save({k: v for k, v in state.items() if k.startswith("lin")}, folder / "alex.pth")
    trunk = {f"features.{k.split('.')[2]}.{k.split('.')[3]}": v for k, v in state.items() if k.startswith("net.")}
    trunk["classifier.1.weight"] = torch.zeros(4, 9216)
    torch.save(trunk, folder / "alexnet-owt-7be5be79.pth")
    two = load_lpips(folder)
    a = torch.rand(2, 3, 64, 64) * 2 - 1
    b = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(one(a, b), two(a, b))
        assert (one(a, b) > 0).all() and torch.allclose(one(a, b), one(b, a))
        assert torch.equal(one(a, a), torch.zeros(2))


def test_image_fidelity_is_one_for_identical_images_and_lower_otherwise(tmp_path):
    torch.save(random_lpips_state(1), tmp_path / "w.pth")
    model = load_lpips(tmp_path / "w.pth")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (80, 60, 3), dtype=np.uint8)
    other = rng.integers(0, 256, (80, 60, 3), dtype=np.uint8)
    assert image_fidelity(model, image, image) == 1.0
    assert image_fidelity(model, image, other) < 1.0
    with pytest.raises(DragInputError, match="same size"):
        image_fidelity(model, image, other[:40])


def test_lpips_trunk_has_torchvisions_alexnet_layout():
    """Same parameter names and shapes as ``torchvision.models.alexnet().features``, and the same ReLU outputs."""
    torchvision = pytest.importorskip("torchvision")
    reference = torchvision.models.alexnet(weights=None).features.eval()
    ours = alexnet_features().eval()
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in reference.state_dict().items()]
    assert [type(m) for m in ours] == [type(m) for m in reference[: len(ours)]]
    assert all(isinstance(ours[i], torch.nn.ReLU) for i in RELU_INDICES)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for index in RELU_INDICES:
            assert torch.allclose(ours[: index + 1](x), reference[: index + 1](x.clone()), atol=1e-6)


def test_missing_or_incomplete_lpips_weights_are_unavailable_with_the_reason(tmp_path):
    with pytest.raises(MetricUnavailable, match="does not exist"):
        load_lpips(tmp_path / "nothing")
    with pytest.raises(MetricUnavailable, match="alex.pth"):
        load_lpips(tmp_path)  # an empty folder
    state = random_lpips_state()
    del state["lin3.model.1.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(MetricUnavailable, match="lins.3.weight"):
        load_lpips(tmp_path / "partial.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(MetricUnavailable, match="cannot read"):
        load_lpips(tmp_path / "junk.pth")
    import safetensors.torch

    safetensors.torch.save_file({k: v.contiguous() for k, v in random_lpips_state().items()}, tmp_path / "w.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:5000])
    with pytest.raises(MetricUnavailable, match="cannot read LPIPS weights from .*cut.safetensors"):
        load_lpips(tmp_path / "cut.safetensors")
    torch.save({**random_lpips_state(), "lin2.model.1.weight": 0.5}, tmp_path / "odd.pth")
    with pytest.raises(MetricUnavailable, match="lins.2.weight"):
        load_lpips(tmp_path / "odd.pth")  # a value that is not a tensor counts as missing
