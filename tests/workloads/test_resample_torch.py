"""The torch resampling path (`trajflow.preprocess.kernels`, backend="torch") against an
independent float64 reference (per-row `np.interp`), against `torchinterp1d` inside the
span, and the input validation shared by every backend."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from resample_cases import TOL, TOL_F32_TIMES, make_case, reference, rel_err  # noqa: E402
from trajflow.preprocess.kernels import (  # noqa: E402
    ResampleError,
    UniformGrid,
    resample,
    resample_streams,
    resolve_backend,
    uniform_grid_for,
    uniform_grid_steps,
)

CASES = [
    # (B, S, T, D)
    (6, 2, 9, 3),
    (5, 7, 1, 1),
    (7, 7, 33, 14),
    (4, 1025, 40, 5),
    (3, 5000, 64, 2),
    (64, 120, 100, 14),
]


@pytest.mark.parametrize("B,S,T,D", CASES)
@pytest.mark.parametrize("target", ["explicit", "grid"])
@pytest.mark.parametrize("ragged", [True, False])
def test_matches_float64_reference(B, S, T, D, target, ragged):
    data, times, lengths, tgt, ref_t = make_case(B * S + T, B, S, T, D, ragged=ragged, target=target)
    out = resample(data, times, tgt, lengths, backend="torch")
    assert out.shape == (B, T, D) and out.dtype == data.dtype
    assert rel_err(out, reference(data, times, lengths, ref_t)) < TOL_F32_TIMES
    # float64 times: the same inputs, now limited only by the float32 weight
    data, times, lengths, tgt, ref_t = make_case(B * S + T, B, S, T, D, ragged=ragged, target=target,
                                                 time_dtype=torch.float64)
    out = resample(data, times, tgt, lengths, backend="torch")
    assert rel_err(out, reference(data, times, lengths, ref_t)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("target", ["explicit", "grid"])
def test_half_precision_data(dtype, target):
    data, times, lengths, tgt, ref_t = make_case(3, 16, 300, 50, 10, dtype, target=target)
    out = resample(data, times, tgt, lengths, backend="torch")
    assert out.dtype == dtype
    assert rel_err(out, reference(data, times, lengths, ref_t)) < TOL[dtype]


@pytest.mark.parametrize("target", ["explicit", "grid"])
def test_float64_epoch_timestamps_keep_precision(target):
    # absolute epoch seconds: float32 would quantise them to 128 s; float64 times are
    # searched and weighted in float64
    data, times, lengths, tgt, ref_t = make_case(
        11, 8, 200, 60, 4, time_dtype=torch.float64, origin=1.7e9, target=target
    )
    out = resample(data, times, tgt, lengths, backend="torch")
    assert rel_err(out, reference(data, times, lengths, ref_t)) < TOL[torch.float32]


def test_float32_times_with_float64_targets_compute_in_float64():
    data, times, lengths, tgt, ref_t = make_case(5, 4, 50, 20, 3, time_dtype=torch.float32)
    out = resample(data, times, tgt.double(), lengths, backend="torch")
    assert rel_err(out, reference(data, times, lengths, ref_t)) < TOL[torch.float32]
    out = resample(data, times, UniformGrid(times[:, 0].double(), 30.0, 20), lengths, backend="torch")
    grid_t = times[:, :1].double() + torch.arange(20, dtype=torch.float64) / 30.0
    assert rel_err(out, reference(data, times, lengths, grid_t)) < TOL[torch.float32]


def test_outside_the_span_holds_the_end_values_exactly():
    data, times, lengths, _, _ = make_case(2, 5, 30, 1, 6)
    L = lengths
    first = times[:, 0].double()
    last = times.double().gather(1, (L - 1)[:, None])[:, 0]
    tgt = torch.stack([first - 5, first - 1e-3, last + 1e-3, last + 50], 1).float()
    out = resample(data, times, tgt, lengths, backend="torch")
    for b in range(5):
        torch.testing.assert_close(out[b, 0], data[b, 0], rtol=0, atol=0)
        torch.testing.assert_close(out[b, 1], data[b, 0], rtol=0, atol=0)
        torch.testing.assert_close(out[b, 2], data[b, L[b] - 1], rtol=0, atol=0)
        torch.testing.assert_close(out[b, 3], data[b, L[b] - 1], rtol=0, atol=0)


def test_targets_on_samples_reproduce_them():
    data, times, lengths, _, _ = make_case(4, 3, 40, 1, 5, ragged=False)
    out = resample(data, times, times, backend="torch")
    torch.testing.assert_close(out, data, rtol=1e-6, atol=1e-6)


def test_padding_never_influences_the_result():
    data, times, lengths, tgt, ref_t = make_case(8, 6, 50, 30, 4)  # padding is NaN / garbage
    L = lengths
    pad = torch.arange(50)[None, :] >= L[:, None]
    assert pad.any() and pad.sum(1).gt(0).sum() >= 2  # several rows really are padded
    out = resample(data, times, tgt, lengths, backend="torch")
    assert torch.isfinite(out).all()
    # the valid samples alone decide it: the float64 reference never sees the padding
    assert rel_err(out, reference(data, times, lengths, ref_t)) < TOL_F32_TIMES
    # and any other padding gives bit for bit the same result: plain values, infinities,
    # and times inside each row's span (which a search that overran the length would hit)
    first = times[:, :1].expand(-1, 50)
    for pad_data, pad_times in ((7.0, torch.full_like(times, 1e9)),
                                (float("inf"), torch.full_like(times, -float("inf"))),
                                (-3e38, first), (0.0, torch.zeros_like(times))):
        other = resample(data.masked_fill(pad[:, :, None], pad_data), torch.where(pad, pad_times, times), tgt, lengths,
                         backend="torch")
        torch.testing.assert_close(out, other, rtol=0, atol=0, msg=lambda m, p=pad_data: f"padding {p}: {m}")


def test_lengths_none_means_all_samples():
    data, times, _, tgt, _ = make_case(9, 4, 20, 10, 3, ragged=False)
    a = resample(data, times, tgt, None, backend="torch")
    b = resample(data, times, tgt, torch.full((4,), 20), backend="torch")
    c = resample(data, times, tgt, [20, 20, 20, 20], backend="torch")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_strided_inputs_give_the_contiguous_result():
    data, times, lengths, tgt, _ = make_case(10, 5, 40, 12, 6)
    expect = resample(data, times, tgt, lengths, backend="torch")
    wide = torch.randn(5, 40, 11)
    wide[:, :, ::2] = data  # last-dim stride 2
    t_wide = torch.randn(5, 80, dtype=times.dtype)
    t_wide[:, ::2] = times
    g_wide = torch.randn(5, 24, dtype=tgt.dtype)
    g_wide[:, 1::2] = tgt
    out = resample(wide[:, :, ::2], t_wide[:, ::2], g_wide[:, 1::2], lengths[:, None].expand(5, 2)[:, 0],
                   backend="torch")
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    # a transposed layout and a shared [T] target row
    dt = data.transpose(1, 2).contiguous().transpose(1, 2)
    shared = tgt[0]
    torch.testing.assert_close(
        resample(dt, times, shared, lengths, backend="torch"),
        resample(data, times, shared.expand(5, 12).contiguous(), lengths, backend="torch"),
        rtol=0, atol=0,
    )


@pytest.mark.parametrize("target", ["explicit", "grid"])
def test_column_major_times_and_targets(target):
    # torch.from_numpy of a Fortran-order array, or x.T of an [S, B] tensor: strides (1, B)
    data, times, lengths, tgt, _ = make_case(11, 6, 30, 12, 4)
    column_major = lambda x: x.T.contiguous().T  # noqa: E731
    assert column_major(times).stride() == (1, 6)
    grid = UniformGrid(times[:, 0].contiguous(), 40.0, 12) if target == "grid" else None
    expect = resample(data, times, grid or tgt, lengths, backend="torch")
    out = resample(data, column_major(times), grid or column_major(tgt), lengths, backend="torch")
    torch.testing.assert_close(out, expect, rtol=0, atol=0)


def test_grid_coordinates_beyond_int64_hold_the_end_values():
    data = torch.arange(4.0).reshape(1, 4, 1)
    times = torch.arange(4.0).reshape(1, 4)
    for grid in (UniformGrid(-1e19, 1.0, 3), UniformGrid(-0.5, 1e19, 3)):  # every target before the first sample
        assert resample(data, times, grid, backend="torch").flatten().tolist() == [0.0, 0.0, 0.0]
    assert resample(data, times, UniformGrid(1e19, 1.0, 3), backend="torch").flatten().tolist() == [3.0, 3.0, 3.0]


def test_times_whose_steps_overflow_are_valid_input():
    # validation compares neighbours instead of subtracting them (the step overflows to inf);
    # the blend weight then rounds to an end of the segment
    data = torch.tensor([[[0.0], [2.0]]])
    for dtype, big in ((torch.float32, 3e38), (torch.float64, 1e308)):
        times = torch.tensor([[-big, big]], dtype=dtype)
        out = resample(data, times, torch.tensor([[0.0]], dtype=dtype), backend="torch", check=True)
        assert 0.0 <= out.item() <= 2.0


def test_two_dimensional_data_returns_two_dimensional_output():
    data, times, lengths, tgt, ref_t = make_case(12, 4, 30, 15, 1)
    out = resample(data[:, :, 0], times, tgt, lengths, backend="torch")
    assert out.shape == (4, 15)
    torch.testing.assert_close(out, resample(data, times, tgt, lengths, backend="torch")[:, :, 0])


def test_uniform_grid_equals_explicit_grid_times():
    data, times, lengths, tgt, ref_t = make_case(13, 6, 80, 70, 3, target="grid", time_dtype=torch.float64)
    a = resample(data, times, tgt, lengths, backend="torch")
    b = resample(data, times, ref_t, lengths, backend="torch")
    assert rel_err(a, b.double().numpy()) < 1e-6
    # a scalar start and a 0-d tensor start broadcast to every row
    g1 = UniformGrid(start=float(times[0, 0]), rate_hz=tgt.rate_hz, num=tgt.num)
    g2 = UniformGrid(start=times[0, 0].clone(), rate_hz=tgt.rate_hz, num=tgt.num)
    torch.testing.assert_close(
        resample(data, times, g1, lengths, backend="torch"), resample(data, times, g2, lengths, backend="torch")
    )


@pytest.mark.parametrize("shape", [(0, 5, 3, 2), (3, 5, 0, 2), (3, 5, 4, 0)])
def test_empty_shapes(shape):
    B, S, T, D = shape
    times = torch.arange(S, dtype=torch.float32).expand(B, S).contiguous()
    out = resample(torch.zeros(B, S, D), times, torch.zeros(B, T), backend="torch")
    assert out.shape == (B, T, D)


def test_resample_streams_shares_one_grid():
    data, times, lengths, tgt, _ = make_case(14, 5, 60, 25, 7, target="grid")
    action = torch.randn(5, 60, 3).to(torch.bfloat16)
    out = resample_streams({"state": data, "action": action}, times, tgt, lengths, backend="torch")
    assert list(out) == ["state", "action"]
    torch.testing.assert_close(out["state"], resample(data, times, tgt, lengths, backend="torch"), rtol=0, atol=0)
    torch.testing.assert_close(out["action"], resample(action, times, tgt, lengths, backend="torch"), rtol=0, atol=0)
    as_list = resample_streams([data, action[:, :, 0]], times, tgt, lengths, backend="torch")
    assert isinstance(as_list, list) and as_list[1].shape == (5, 25)
    torch.testing.assert_close(as_list[1], out["action"][:, :, 0], rtol=0, atol=0)


def test_agrees_with_torchinterp1d_inside_the_span():
    torchinterp1d = pytest.importorskip("torchinterp1d")
    B, S, T, D = 32, 120, 100, 14
    data, times, _, _, _ = make_case(15, B, S, T, D, ragged=False)
    g = torch.Generator().manual_seed(1)
    u = torch.rand(B, T, generator=g, dtype=torch.float64).sort(1).values
    first, last = times[:, :1].double(), times[:, -1:].double()
    tgt = (first + u * (last - first)).float().clamp(times[:, :1], times[:, -1:])  # inside only
    ours = resample(data, times, tgt, backend="torch")
    # torchinterp1d interpolates 2-D [N, S]: fold D into the batch
    x = times[:, None, :].expand(B, D, S).reshape(B * D, S)
    y = data.permute(0, 2, 1).reshape(B * D, S)
    xn = tgt[:, None, :].expand(B, D, T).reshape(B * D, T)
    theirs = torchinterp1d.interp1d(x, y, xn).reshape(B, D, T).permute(0, 2, 1)
    assert rel_err(ours, theirs.double().numpy()) < 1e-5


# ---- grid helpers ---------------------------------------------------------------------


def test_uniform_grid_steps_covers_each_span():
    times = torch.tensor([[0.0, 0.5, 1.0], [2.0, 2.1, 2.3], [0.0, 0.1, 0.3]], dtype=torch.float64)
    steps = uniform_grid_steps(times, 10.0)
    # 1.0 s at 10 Hz -> 11 points; 0.3 s (0.30000000000000004 - 0) -> 4 points
    assert steps.tolist() == [11, 4, 4]
    assert uniform_grid_steps(times, 10.0, lengths=torch.tensor([2, 3, 2])).tolist() == [6, 4, 2]
    assert uniform_grid_steps(times.float(), 3.0).tolist() == [4, 1, 1]
    grid, st = uniform_grid_for(times, 10.0, lengths=[3, 3, 2])
    assert st.tolist() == [11, 4, 2] and grid.num == 11 and grid.rate_hz == 10.0
    torch.testing.assert_close(grid.start, times[:, 0])
    # the last grid point of every row lies inside its span (within rounding)
    last = times[:, 0] + (st - 1).double() / 10.0
    assert (last <= torch.tensor([1.0, 2.3, 0.1], dtype=torch.float64) + 1e-9).all()


def test_uniform_grid_steps_allow_for_how_the_times_were_rounded():
    # LeRobot stores frame_index / fps as float32: 99 / 30 is stored as 3.29999995, so a span
    # of exactly 99 periods reads as 98.9999986 of them
    times = torch.from_numpy(np.stack([np.arange(100) / 30, np.arange(100) / 30 + 7]).astype(np.float32)).double()
    assert uniform_grid_steps(times, 30.0).tolist() == [99, 100]
    rounding = torch.tensor([np.finfo(np.float32).eps * 3.3, np.finfo(np.float32).eps * 10.3], dtype=torch.float64)
    assert uniform_grid_steps(times, 30.0, time_rounding=rounding).tolist() == [100, 100]
    assert uniform_grid_steps(times, 30.0, time_rounding=1e-6).tolist() == [100, 100]
    # a span well short of the next period stays short whatever the rounding
    assert uniform_grid_steps(times[:, :99] + 0.0, 30.0 * 0.999, time_rounding=rounding).tolist() == [98, 98]
    # a slack as long as a step (whole ms at 1 or 2 kHz) adds no frame
    spans = torch.tensor([[0.0, 1.0], [0.0, 0.999]], dtype=torch.float64)
    assert uniform_grid_steps(spans, 1000.0, time_rounding=1e-3).tolist() == [1001, 1000]
    assert uniform_grid_steps(spans, 2000.0, time_rounding=1e-3).tolist() == [2001, 1999]


def test_uniform_grid_steps_rejects_bad_rates():
    with pytest.raises(ResampleError, match="rate_hz"):
        uniform_grid_steps(torch.zeros(2, 3), 0.0)


def test_resolve_backend():
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ResampleError, match="backend"):
        resolve_backend("cuda", "cpu")


# ---- validation -----------------------------------------------------------------------


def _good(B=4, S=10, T=6, D=3):
    times = torch.arange(S, dtype=torch.float32).repeat(B, 1) * 0.1
    data = torch.randn(B, S, D)
    tgt = torch.linspace(0, 0.9, T).repeat(B, 1)
    return data, times, tgt


def _raises(match, *args, **kwargs):
    kwargs.setdefault("backend", "torch")
    with pytest.raises(ResampleError, match=match):
        resample(*args, **kwargs)


def test_duplicate_time_names_the_row():
    data, times, tgt = _good()
    times[2, 5] = times[2, 4]
    _raises(r"row 2: times must be strictly increasing.*times\[2, 5\] = .* duplicates times\[2, 4\]",
            data, times, tgt)


def test_decreasing_time_names_the_row():
    data, times, tgt = _good()
    times[3, 7] = 0.0
    _raises(r"row 3: .*times\[3, 7\] = 0.0 is before times\[3, 6\]", data, times, tgt)


def test_several_bad_rows_are_counted():
    data, times, tgt = _good()
    times[1, 3] = times[1, 2]
    times[3, 3] = times[3, 2]
    _raises(r"row 1: .*\(2 rows fail this check\)", data, times, tgt)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_time_names_the_row(bad):
    data, times, tgt = _good()
    times[1, 0] = bad
    _raises(r"row 1: times\[1, 0\] is (nan|inf|-inf)", data, times, tgt)


def test_non_finite_targets_and_start():
    data, times, tgt = _good()
    tgt[2, 3] = float("nan")
    _raises(r"row 2: target time \[2, 3\] is nan", data, times, tgt)
    start = times[:, 0].clone()
    start[1] = float("inf")
    _raises(r"row 1: UniformGrid.start is inf", data, times, UniformGrid(start, 10.0, 5))


def test_non_finite_data_in_valid_samples_names_the_row_but_padding_may_hold_anything():
    data, times, tgt = _good()
    lengths = torch.tensor([10, 6, 10, 10])
    data[1, 7:] = float("nan")  # padding: fine
    times[1, 6:] = float("nan")
    resample(data, times, tgt, lengths, backend="torch")
    data[1, 5, 2] = float("inf")
    _raises(r"row 1: data\[1, 5, 2\] is inf", data, times, tgt, lengths)
    with pytest.raises(ResampleError, match=r"row 1: stream 'action'\[1, 5, 2\] is inf"):
        resample_streams({"ok": torch.zeros(4, 10, 1), "action": data}, times, tgt, lengths, backend="torch")


def test_huge_finite_data_is_not_mistaken_for_inf():
    data, times, tgt = _good()
    data[0, 3] = 3e38  # the per-sample float32 sum overflows; the exact re-check clears it
    out = resample(data, times, tgt, backend="torch")
    assert out.shape == (4, 6, 3) and torch.isfinite(out).all()
    # elementwise (a norm would be all 3e38): the huge value is interpolated like any other
    ref = reference(data, times, None, tgt.double())
    assert ref[0].max() > 1e38  # the huge sample does reach the output
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths,match", [
    ([10, 1, 10, 10], r"row 1: length 1 < 2"),
    ([10, 10, 11, 10], r"row 2: length 11 > S=10"),
    ([10, 10, 10, 0], r"row 3: length 0 < 2"),
])
def test_bad_lengths(lengths, match):
    data, times, tgt = _good()
    _raises(match, data, times, tgt, torch.tensor(lengths))


def test_single_sample_rows_are_rejected_even_unchecked():
    _raises(r"length 1 < 2", torch.zeros(2, 1, 3), torch.zeros(2, 1), torch.zeros(2, 4), check=False)


@pytest.mark.parametrize("mutate,match", [
    (lambda d, t, g: (d[:, :, None], t, g), r"data must be \[B, S, D\]"),
    (lambda d, t, g: (d[:, :9], t, g), r"data has shape \(4, 9, 3\) but times has shape \(4, 10\)"),
    (lambda d, t, g: (d[:3], t, g), r"data has shape \(3, 10, 3\)"),
    (lambda d, t, g: (d, t[:, :, None], g), r"times must be 2-D"),
    (lambda d, t, g: (d, t, g[:3]), r"target times must be \[B=4, T\]"),
    (lambda d, t, g: (d.double(), t, g), r"data has dtype torch.float64"),
    (lambda d, t, g: (d.int(), t, g), r"data has dtype torch.int32"),
    (lambda d, t, g: (d, t.half(), g), r"times must be float32 or float64"),
    (lambda d, t, g: (d, t.long(), g), r"times must be float32 or float64"),
    (lambda d, t, g: (d, t, g.half()), r"target times must be float32 or float64"),
    (lambda d, t, g: (d, t, g.tolist()), r"target must be a tensor"),
    (lambda d, t, g: (d.numpy(), t, g), r"data must be a torch.Tensor"),
    (lambda d, t, g: (d, t.to("meta"), g), r"data is on cpu but times is on meta"),
])
def test_shape_dtype_and_device_errors(mutate, match):
    data, times, tgt = _good()
    _raises(match, *mutate(data, times, tgt))


@pytest.mark.parametrize("lengths,match", [
    (torch.tensor([10, 10, 10]), r"lengths must be 1-D \[B=4\]"),
    (torch.tensor([10.0, 10, 10, 10]), r"lengths must be an integer tensor"),
])
def test_bad_lengths_argument(lengths, match):
    data, times, tgt = _good()
    _raises(match, data, times, tgt, lengths)


@pytest.mark.parametrize("grid,match", [
    (UniformGrid(0.0, 0.0, 5), r"rate_hz must be a finite number >= 1e-38"),
    (UniformGrid(0.0, float("nan"), 5), r"rate_hz must be a finite number >= 1e-38"),
    (UniformGrid(0.0, 1e-39, 5), r"rate_hz must be a finite number >= 1e-38 \(a period float32 holds\)"),
    (UniformGrid(0.0, 10.0, -1), r"num must be an integer >= 0"),
    (UniformGrid(0.0, 10.0, 2.5), r"num must be an integer >= 0"),
    (UniformGrid(torch.zeros(3), 10.0, 5), r"start must be a number, a 0-d tensor or \[B=4\]"),
    (UniformGrid(torch.zeros(4, dtype=torch.float16), 10.0, 5), r"start must be float32 or float64"),
    (UniformGrid("0", 10.0, 5), r"start must be a number or a tensor"),
])
def test_bad_uniform_grids(grid, match):
    data, times, _ = _good()
    _raises(match, data, times, grid)


def test_unknown_backend():
    data, times, tgt = _good()
    _raises(r"backend must be one of auto, triton, torch", data, times, tgt, backend="cuda")


def test_check_false_trusts_the_input_and_stays_in_bounds():
    data, times, tgt = _good()
    times[2, 5] = times[2, 4]  # would be rejected with check=True
    out = resample(data, times, tgt, check=False, backend="torch")
    assert out.shape == (4, 6, 3)
    # lengths outside [2, S] are clamped, never used to index out of bounds
    out = resample(data, times, tgt, torch.tensor([0, 1, 10, 99]), check=False, backend="torch")
    assert out.shape == (4, 6, 3) and torch.isfinite(out[2:]).all()
    # NaN targets / start produce unspecified values but no error
    tgt[0, 0] = float("nan")
    resample(data, times, tgt, check=False, backend="torch")
    resample(data, times, UniformGrid(float("nan"), 10.0, 4), check=False, backend="torch")


def test_resample_error_is_a_value_error():
    assert issubclass(ResampleError, ValueError)
