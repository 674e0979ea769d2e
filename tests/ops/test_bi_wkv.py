"""Bi-WKV paths against references in float64 (tests/reference.py), across shapes, dtypes and decays."""

import pytest
import torch

from rwkv_clip_hf.ops.bi_wkv import bi_wkv, chunk_bi_wkv, naive_bi_wkv

from reference import wkv_by_definition, wkv_by_recurrence


def make_inputs(batch, seq_len, heads, size, decay="mixed", seed=0):
    """float64 r, k, v, w, u. `decay` picks the range of w = log(-log(per-step decay))."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(batch, seq_len, heads, size, generator=g, dtype=torch.float64) for _ in range(3))
    u = torch.randn(heads, size, generator=g, dtype=torch.float64)
    shape = (batch, seq_len, heads, size)
    uniform = torch.rand(shape, generator=g, dtype=torch.float64)
    if decay == "mixed":  # every regime at once: decays from ~1 - 2e-9 down to exactly 0
        w = -20.0 + 30.0 * uniform
    elif decay == "none":  # w = -20: decay 1 - 2e-9 per step, i.e. no forgetting
        w = torch.full(shape, -20.0, dtype=torch.float64)
    elif decay == "full":  # w = +10: decay exp(-22026) = 0, only neighbours interact
        w = torch.full(shape, 10.0, dtype=torch.float64)
    elif decay == "spikes":  # mostly ~1, with occasional total resets: the cancellation trap
        w = torch.where(uniform < 0.1, 10.0, -20.0 + 18.0 * torch.rand(shape, generator=g, dtype=torch.float64))
    elif decay == "trained":  # the range a trained model uses
        w = -6.0 + 7.0 * uniform
    else:
        raise ValueError(decay)
    return r, k, v, w, u


def rel_err(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def test_references_agree():
    """The two test references (definition and recurrence) and the package's naive path agree."""
    for decay in ("mixed", "none", "full", "spikes"):
        r, k, v, w, u = make_inputs(2, 9, 2, 4, decay, seed=1)
        by_recurrence = wkv_by_recurrence(r, k, v, w, u)
        naive = naive_bi_wkv(r, k, v, w, u)
        for b in range(2):
            for h in range(2):
                by_definition = wkv_by_definition(r[b, :, h], k[b, :, h], v[b, :, h], w[b, :, h], u[h])
                torch.testing.assert_close(by_recurrence[b, :, h], by_definition, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(naive, by_recurrence, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seq_len", [1, 2, 7, 49, 77, 196, 1000])
@pytest.mark.parametrize("size", [16, 64, 80])
@pytest.mark.parametrize("decay", ["mixed", "none", "full", "spikes"])
def test_forward_against_float64_reference(seq_len, size, decay):
    heads = 2
    batch = 1 if seq_len == 1000 else 2
    r, k, v, w, u = make_inputs(batch, seq_len, heads, size, decay, seed=seq_len + size)
    reference = naive_bi_wkv(r, k, v, w, u)  # itself checked against the definition above

    y32 = bi_wkv(*(x.float() for x in (r, k, v, w, u)))
    assert y32.dtype == torch.float32 and y32.shape == r.shape
    assert rel_err(y32, reference) <= 1e-5

    y64 = bi_wkv(r, k, v, w, u)
    assert y64.dtype == torch.float64
    assert (y64 - reference).abs().max().item() <= 1e-10 * max(1.0, reference.abs().max().item())


@pytest.mark.parametrize("seq_len,size", [(1, 16), (7, 16), (49, 80), (77, 64), (196, 64)])
@pytest.mark.parametrize("decay", ["mixed", "spikes", "trained"])
def test_gradients_against_float64_reference(seq_len, size, decay):
    inputs = make_inputs(2, seq_len, 2, size, decay, seed=7 * seq_len + size)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    ref_inputs = [x.clone().requires_grad_() for x in inputs]
    naive_bi_wkv(*ref_inputs).backward(grad_out)

    fast_inputs = [x.float().requires_grad_() for x in inputs]
    bi_wkv(*fast_inputs).backward(grad_out.float())
    for name, fast, ref in zip("rkvwu", fast_inputs, ref_inputs):
        if ref.grad is None:  # T = 1: w never enters the output
            assert fast.grad is None or not fast.grad.any(), name
            continue
        assert rel_err(fast.grad, ref.grad) <= 1e-4, name


def test_gradcheck_float64():
    for decay in ("mixed", "spikes", "trained"):
        inputs = [x.requires_grad_() for x in make_inputs(1, 6, 2, 4, decay, seed=11)]
        assert torch.autograd.gradcheck(lambda *xs: chunk_bi_wkv(*xs, chunk_size=2), inputs)
        assert torch.autograd.gradcheck(lambda *xs: chunk_bi_wkv(*xs, chunk_size=16), inputs)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 16, 64, 100])
def test_chunk_size_does_not_change_the_result(chunk_size):
    r, k, v, w, u = make_inputs(2, 50, 3, 8, "mixed", seed=5)
    reference = naive_bi_wkv(r, k, v, w, u)
    y = chunk_bi_wkv(r, k, v, w, u, chunk_size=chunk_size)
    assert (y - reference).abs().max().item() <= 1e-10 * reference.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32(dtype):
    r, k, v, w, u = make_inputs(2, 49, 2, 16, "trained", seed=2)
    half = [x.to(dtype) for x in (r, k, v, w, u)]
    y = bi_wkv(*half)
    assert y.dtype == dtype
    # exactly the float32 computation on the (rounded) half inputs, rounded once at the end
    expected = bi_wkv(*(x.float() for x in half))
    torch.testing.assert_close(y, expected.to(dtype), rtol=0, atol=0)
    assert rel_err(y.float(), naive_bi_wkv(*(x.double() for x in half))) <= 1e-2


def test_autocast_does_not_lower_precision():
    r, k, v, w, u = (x.float() for x in make_inputs(2, 77, 2, 64, "trained", seed=4))
    expected = bi_wkv(r, k, v, w, u)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bi_wkv(r, k, v, w, u)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_fully_decayed_channels_give_exact_neighbour_free_output():
    """With decay exactly 0 (w = +10) a token sees only itself and its two neighbours."""
    r, k, v, w, u = make_inputs(1, 20, 1, 4, "full", seed=9)
    y = bi_wkv(r, k, v, w, u)
    rk = (r[:, :, :, None, :] * k[:, None, :, :, :]).sum(-1)  # rk[b, t, i, h] = r_t . k_i
    for t in range(20):
        expected = (r[0, t, 0] * u[0] * k[0, t, 0]).sum() * v[0, t, 0]
        if t > 0:
            expected = expected + rk[0, t, t - 1, 0] * v[0, t - 1, 0]
        if t < 19:
            expected = expected + rk[0, t, t + 1, 0] * v[0, t + 1, 0]
        torch.testing.assert_close(y[0, t, 0], expected, rtol=1e-12, atol=1e-12)


def test_memory_is_linear_in_sequence_length():
    """No (T, T) intermediate: doubling T at most about doubles the largest tensor the op allocates."""
    from torch.profiler import ProfilerActivity, profile

    def peak(seq_len):
        inputs = [x.float() for x in make_inputs(1, seq_len, 1, 16, "trained", seed=0)]
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            bi_wkv(*inputs)
        return max(event.cpu_memory_usage for event in prof.key_averages())

    small, large = peak(1024), peak(4096)
    assert large <= 5 * small, (small, large)


def test_training_after_inference_mode():
    """Constants cached during an inference_mode call must still be usable by autograd afterwards."""
    for seq_len in (5, 23):  # one chunk, several chunks
        inputs = [x.float() for x in make_inputs(1, seq_len, 2, 4, "trained", seed=seq_len)]
        with torch.inference_mode():
            expected = bi_wkv(*inputs)
        inputs = [x.requires_grad_() for x in inputs]
        y = bi_wkv(*inputs)
        y.sum().backward()
        torch.testing.assert_close(y.detach(), expected, rtol=0, atol=0)
        assert all(x.grad is not None for x in inputs)


def test_shape_errors_are_clear():
    r, k, v, w, u = (x.float() for x in make_inputs(1, 4, 2, 8))
    with pytest.raises(ValueError, match="k has shape"):
        bi_wkv(r, k[:, :3], v, w, u)
    with pytest.raises(ValueError, match="u has shape"):
        bi_wkv(r, k, v, w, u[:1])
    with pytest.raises(ValueError, match="batch, seq_len, heads, head_size"):
        bi_wkv(r[0], k[0], v[0], w[0], u)
