"""The flow engine (dragkit.flow, flow_hooks, flow_module) on analytic velocity fields and a toy BFL-layout network.

Host-free and fast. The released-code parity and the ComfyUI path are in
tests/host/test_flux_host.py (they need ComfyUI's FLUX model).
"""

from __future__ import annotations

import pytest
import torch

from dragkit.attention import AttnLayer
from dragkit.errors import DragInputError
from dragkit.flow import (
    FlowSchedule, active_calls, call_times, flow_invert, flow_sample, flux_mu, flux_sigmas, integrate,
    released_pairing, time_pairing,
)
from dragkit.flow_hooks import NON_RIDGE, flux_layers, kv_hooks, select_flux_layers
from dragkit.flow_module import image_ids, pack, unpack


def test_flux_schedule_matches_bfl_get_schedule_formula():
    sig = flux_sigmas(25, flux_mu(4096))
    assert len(sig) == 26 and sig[0] == pytest.approx(1.0) and sig[-1] == 0.0
    t = 0.5  # unshifted midpoint: e^mu / (e^mu + 1)
    assert flux_sigmas(2, 1.15)[1] == pytest.approx(torch.tensor(1.15).exp().item() / (torch.tensor(1.15).exp().item() + 1 / t - 1), rel=1e-6)
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    schedule = FlowSchedule.from_strength(sig, 0.76)
    assert schedule.skip == 6 and schedule.num_inversion_steps == 19  # DragFlow: 25 steps, skip 6
    assert schedule.inversion_times()[0] == 0.0 and schedule.inversion_times()[-1] == schedule.t_star == sig[6]


def test_fireflow_makes_one_call_per_step_after_the_first_and_euler_one_per_step():
    times = [0.0, 0.25, 0.5, 1.0]
    assert call_times(times, "fireflow") == [0.0, 0.125, 0.375, 0.75]
    assert call_times(times, "euler") == [0.0, 0.25, 0.5]
    calls = []
    integrate(lambda x, t: calls.append(t) or torch.zeros_like(x), torch.zeros(1, 1, 2, 2), times, "fireflow")
    assert calls == call_times(times, "fireflow")


@pytest.mark.parametrize("solver", ["fireflow", "euler"])
def test_integrate_is_exact_for_a_constant_velocity_and_inverts_back(solver):
    v = torch.randn(1, 4, 2, 2)
    x0 = torch.randn(1, 4, 2, 2)
    times = list(flux_sigmas(8, 1.15)[::-1])
    x1 = integrate(lambda x, t: v, x0, times, solver)
    torch.testing.assert_close(x1, x0 + v * (times[-1] - times[0]))
    torch.testing.assert_close(integrate(lambda x, t: v, x1, times[::-1], solver), x0)


def test_fireflow_midpoint_is_second_order_on_a_time_dependent_field():
    # dx/dt = 2t x: exact x(1) = x(0) e^1. FireFlow's error shrinks ~4x when the steps halve, Euler's ~2x.
    field = lambda x, t: 2 * t * x  # noqa: E731
    x0 = torch.ones(1, 1, 1, 1)
    errors = {}
    for solver in ("fireflow", "euler"):
        errors[solver] = [
            (integrate(field, x0, torch.linspace(0, 1, n + 1).tolist(), solver) - torch.e).abs().item() for n in (20, 40)
        ]
    assert errors["fireflow"][0] / errors["fireflow"][1] > 3.0
    assert errors["euler"][0] / errors["euler"][1] < 2.5


def test_released_pairing_is_a_stack_and_time_pairing_matches_midpoints():
    assert released_pairing(20, 20) == list(range(19, -1, -1))
    schedule = FlowSchedule(flux_sigmas(10, 1.15), 3)
    inv = call_times(schedule.inversion_times(), "fireflow")
    samp = call_times(schedule.sampling_times(3), "fireflow")
    paired = time_pairing(inv, samp)
    assert paired[0] == len(inv) - 1  # t* was never evaluated: the nearest recorded call, the last midpoint
    assert [inv[i] for i in paired[1:]] == pytest.approx(samp[1:])  # every midpoint meets its own recorded midpoint
    assert released_pairing(len(inv), len(samp))[1:] == [i - 1 for i in paired[1:]]  # released: one step less noisy


def test_active_calls_follow_the_step_fractions():
    times = [1.0, 0.75, 0.5, 0.25, 0.0]
    assert active_calls(times, "fireflow", 0.0, 1.0) == {0, 1, 2, 3, 4}
    assert active_calls(times, "fireflow", 0.5, 1.0) == {3, 4}
    assert active_calls(times, "euler", 0.0, 0.5) == {0, 1}
    with pytest.raises(DragInputError, match="injection range"):
        active_calls(times, "euler", 0.6, 0.5)


def test_pack_and_unpack_are_bfl_patch_tokens():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).view(1, 2, 4, 6)
    tokens = pack(x)
    assert tokens.shape == (1, 6, 8)
    # token 1 = patch row 0, column 1: channel 0's 2x2 block at x[..., 0:2, 2:4], then channel 1's
    assert tokens[0, 1].tolist() == [2, 3, 8, 9, 26, 27, 32, 33]
    torch.testing.assert_close(unpack(tokens, 4, 6), x)
    assert image_ids(4, 6)[0, 4].tolist() == [0, 1, 1]


class _Attn(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)


class _Double(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.hidden_size = hidden
        self.img_attn = _Attn(hidden)

    def forward(self, x):
        q, k, v = self.img_attn.qkv(x).chunk(3, dim=-1)
        return x + torch.softmax(q @ k.transpose(1, 2), -1) @ v


class _Single(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.hidden_size = hidden
        self.linear1 = torch.nn.Linear(hidden, 3 * hidden + 2 * hidden)

    def forward(self, x):
        q, k, v, _ = self.linear1(x).split([self.hidden_size] * 3 + [2 * self.hidden_size], dim=-1)
        return x + torch.softmax(q @ k.transpose(1, 2), -1) @ v


class _ToyFlux(torch.nn.Module):
    """Two double and three single 'blocks' with BFL's projection names, on (1, tokens, 8) inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.double_blocks = torch.nn.ModuleList([_Double(8) for _ in range(2)])
        self.single_blocks = torch.nn.ModuleList([_Single(8) for _ in range(3)])

    def forward(self, x):
        for block in [*self.double_blocks, *self.single_blocks]:
            x = block(x)
        return x


class _ToyBackend:
    """A FlowBackend whose velocity is the toy network on the latent's pixels as tokens (scaled small)."""

    model_key = "toy"

    def __init__(self):
        self.network = _ToyFlux()
        self.layers = flux_layers(self.network)

    def kv_layers(self):
        return self.layers

    def run(self, loop, x_start, conditioning, control, times):
        def velocity(x, t):
            tokens = x.flatten(2).transpose(1, 2)
            return 0.1 * (self.network(tokens) - tokens).transpose(1, 2).reshape(x.shape) * (1 + t)

        with torch.no_grad(), kv_hooks(self.network, self.layers, control):
            return loop(velocity, x_start)


def test_flux_layer_selection_text():
    layers = flux_layers(_ToyFlux())
    assert [layer.name for layer in layers] == [
        "double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1", "single_blocks.2"]
    assert [layer.name for layer in select_flux_layers(layers, "non-ridge")] == ["double_blocks.0"]  # the released blocks it has
    assert [layer.index for layer in select_flux_layers(layers, "d1, s1-")] == [1, 3, 4]
    assert select_flux_layers(layers, "none") == ()
    assert len(select_flux_layers(layers, "all")) == 5 == len(select_flux_layers(layers, "double, single"))
    for bad, message in (("decoder", "cannot read"), ("s3", "outside"), ("", "empty")):
        with pytest.raises(DragInputError, match=message):
            select_flux_layers(layers, bad)
    full = tuple(AttnLayer(i, "double" if i < 19 else "single", f"{'double' if i < 19 else 'single'}_blocks.{i if i < 19 else i - 19}", 8)
                 for i in range(57))
    chosen = select_flux_layers(full, "non-ridge")
    assert [int(layer.name.rsplit(".", 1)[1]) for layer in chosen] == [*NON_RIDGE["double"], *NON_RIDGE["single"]]


def test_hooks_record_the_projection_keys_values_and_injection_replaces_them():
    backend = _ToyBackend()
    x0 = torch.randn(1, 8, 2, 2)
    schedule = FlowSchedule(flux_sigmas(6, 1.15), 1)
    cache = flow_invert(backend, x0, None, schedule, backend.layers)
    assert len(cache.kv) == len(cache.call_times) == 6  # FireFlow: 5 steps, 6 calls
    k, v = cache.kv[0][4]
    assert k.shape == v.shape == (1, 4, 8)
    tokens = x0.flatten(2).transpose(1, 2)
    with torch.no_grad():  # the first call sees the source itself: recorded K/V = the first block's projection of it
        expected = backend.network.double_blocks[0].img_attn.qkv(tokens)
    torch.testing.assert_close(cache.kv[0][0][0], expected[..., 8:16])
    torch.testing.assert_close(cache.kv[0][0][1], expected[..., 16:])
    plain = flow_sample(backend, cache.x_star, None, cache, schedule.skip, ())
    injected = flow_sample(backend, cache.x_star, None, cache, schedule.skip, backend.layers)
    assert (plain - injected).abs().max() > 1e-4  # positive control: injection changes the result
    off = flow_sample(backend, cache.x_star, None, cache, schedule.skip, backend.layers, 1.0, 1.0)
    torch.testing.assert_close(off, plain)  # an empty injection range leaves sampling alone
    # hooks are gone afterwards: the network runs as before
    assert not backend.network.double_blocks[0].img_attn.qkv._forward_hooks


def test_the_cache_refuses_another_latent_or_model():
    backend = _ToyBackend()
    schedule = FlowSchedule(flux_sigmas(4, 1.15), 1)
    cache = flow_invert(backend, torch.randn(1, 8, 2, 2), None, schedule, backend.layers)
    with pytest.raises(DragInputError, match="shape"):
        flow_sample(backend, torch.randn(1, 8, 4, 2), None, cache, 1, backend.layers)
    backend.model_key = "other"
    with pytest.raises(DragInputError, match="different model"):
        flow_sample(backend, cache.x_star, None, cache, 1, backend.layers)


def test_injection_of_uncached_blocks_is_refused():
    backend = _ToyBackend()
    schedule = FlowSchedule(flux_sigmas(4, 1.15), 1)
    cache = flow_invert(backend, torch.randn(1, 8, 2, 2), None, schedule, backend.layers[:1])
    with pytest.raises(DragInputError, match="not cached"):
        flow_sample(backend, cache.x_star, None, cache, 1, backend.layers)


def test_schedule_errors():
    with pytest.raises(DragInputError, match="skip"):
        FlowSchedule(flux_sigmas(4, 1.15), 4)
    with pytest.raises(DragInputError, match="solver"):
        FlowSchedule(flux_sigmas(4, 1.15), 1, "heun")
    with pytest.raises(DragInputError, match="inverts no step"):
        FlowSchedule.from_strength(flux_sigmas(4, 1.15), 0.1)


