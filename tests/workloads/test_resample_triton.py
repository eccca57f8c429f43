"""The Triton resampling kernel, run by Triton's interpreter on the CPU, against the float64
reference; its CUDA compilation (offline, no GPU needed); and, where a GPU exists, the
compiled kernel against the torch path.

How the interpreter is selected: ``TRITON_INTERPRET=1`` is read when ``@triton.jit``
decorates a function, i.e. when the module defining the kernel is imported, so setting it
later in a test process has no effect. `triton_impl.kernel(interpret=True)` therefore
builds the interpreted kernel on demand (under ``triton.knobs.runtime.scope()``), and
``backend="triton"`` with CPU tensors uses it: the tests do not depend on import order or
on the environment. One test also runs a subprocess with ``TRITON_INTERPRET=1`` set before
any import, the documented way.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

from resample_cases import TOL, TOL_F32_TIMES, make_case, reference, rel_err  # noqa: E402
from trajflow.preprocess.kernels import ResampleError, UniformGrid, api, resample, resample_streams, triton_impl  # noqa: E402
from trajflow.preprocess.kernels.common import Problem, prepare  # noqa: E402


@pytest.fixture
def poisoned(monkeypatch):
    """Outputs start as NaN, so an element the kernel fails to write shows up."""
    def new_outputs(self):
        return [torch.full((self.B, self.T, x.shape[2]), float("nan"), dtype=x.dtype, device=self.device)
                for x in self.streams]

    monkeypatch.setattr(Problem, "new_outputs", new_outputs)


def run_triton(*args, **kwargs):
    return resample(*args, backend="triton", **kwargs)


# Small B and T keep the interpreter fast: it executes each program in numpy.
CASES = [
    # (B, S, T, D)
    (4, 2, 9, 3),
    (5, 7, 1, 1),
    (3, 7, 40, 14),  # two T blocks of 32
    (3, 1025, 20, 5),
    (2, 5000, 24, 2),
    (2, 130, 33, 70),  # D beyond one 64-wide block
]


@pytest.mark.parametrize("B,S,T,D", CASES)
@pytest.mark.parametrize("target", ["explicit", "grid"])
@pytest.mark.parametrize("ragged", [True, False])
def test_interpreter_matches_float64_reference(poisoned, B, S, T, D, target, ragged):
    for time_dtype, tol in ((torch.float32, TOL_F32_TIMES), (torch.float64, TOL[torch.float32])):
        data, times, lengths, tgt, ref_t = make_case(B * S + T + 1, B, S, T, D, ragged=ragged, target=target,
                                                     time_dtype=time_dtype)
        out = run_triton(data, times, tgt, lengths)
        assert out.shape == (B, T, D) and out.dtype == data.dtype
        assert not out.isnan().any(), "an output element was not written"
        assert rel_err(out, reference(data, times, lengths, ref_t)) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("target", ["explicit", "grid"])
def test_interpreter_half_precision(poisoned, dtype, target):
    data, times, lengths, tgt, ref_t = make_case(21, 3, 90, 40, 10, dtype, target=target, time_dtype=torch.float64)
    out = run_triton(data, times, tgt, lengths)
    assert out.dtype == dtype and not out.isnan().any()
    assert rel_err(out, reference(data, times, lengths, ref_t)) < TOL[dtype]


def test_interpreter_epoch_timestamps(poisoned):
    for target in ("explicit", "grid"):
        data, times, lengths, tgt, ref_t = make_case(22, 3, 60, 30, 3, time_dtype=torch.float64, origin=1.7e9,
                                                     target=target)
        out = run_triton(data, times, tgt, lengths)
        assert rel_err(out, reference(data, times, lengths, ref_t)) < TOL[torch.float32]


def test_interpreter_float32_grid_far_from_zero(poisoned):
    # targets start + j / rate in absolute float32 would round to ulp(1e4) / 2 (0.5 ms):
    # the kernel compares times relative to the grid's start, as the torch path does
    S, T, rate = 400, 300, 200.0
    times = (1e4 + torch.arange(S, dtype=torch.float64) / 250.0).float()[None]
    data = torch.sin(7 * (times.double() - 1e4)).float()[:, :, None]
    grid = UniformGrid(times[:, 0].contiguous(), rate, T)
    ref_t = times[:, :1].double() + torch.arange(T, dtype=torch.float64) / rate
    ref = torch.from_numpy(reference(data, times, None, ref_t))
    for backend in ("triton", "torch"):
        out = resample(data, times, grid, backend=backend)
        assert (out.double() - ref).abs().max() < 1e-5, backend


def test_interpreter_agrees_with_torch_path(poisoned):
    data, times, lengths, tgt, _ = make_case(23, 4, 50, 37, 6, target="grid", time_dtype=torch.float64)
    a = run_triton(data, times, tgt, lengths)
    b = resample(data, times, tgt, lengths, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_values_near_the_float_limit_stay_finite(poisoned, backend, dtype):
    # neighbours of opposite signs beyond 1.7e38: their difference overflows float32
    times = torch.arange(6, dtype=torch.float32)[None].repeat(2, 1)
    data = torch.tensor([3e38, -3e38, 3e38, -3e38, 2e38, -2e38])[None, :, None].repeat(2, 1, 1).to(dtype)
    tgt = torch.tensor([0.0, 0.5, 1.0, 2.25, 4.0, 5.0])[None].repeat(2, 1)
    out = resample(data, times, tgt, backend=backend)
    assert torch.isfinite(out).all(), out[0, :, 0]
    ref = reference(data, times, None, tgt.double())
    torch.testing.assert_close(out.double().numpy(), ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)


def test_interpreter_ends_hold_exactly_and_padding_is_ignored(poisoned):
    data, times, lengths, _, _ = make_case(24, 4, 20, 1, 3)  # NaN / garbage padding
    L = lengths
    first = times[:, 0].double()
    last = times.double().gather(1, (L - 1)[:, None])[:, 0]
    tgt = torch.stack([first - 5, last + 5], 1).float()
    out = run_triton(data, times, tgt, lengths)
    for b in range(4):
        assert torch.equal(out[b, 0], data[b, 0])
        assert torch.equal(out[b, 1], data[b, L[b] - 1])


def test_interpreter_strided_inputs(poisoned):
    data, times, lengths, tgt, _ = make_case(25, 3, 30, 12, 5, time_dtype=torch.float64)
    expect = run_triton(data, times, tgt, lengths)
    wide = torch.randn(3, 30, 9)
    wide[:, :, ::2] = data  # a non-unit stride along D, read as is by the kernel
    t_wide = torch.randn(3, 60, dtype=times.dtype)
    t_wide[:, 1::2] = times
    out = run_triton(wide[:, :, ::2], t_wide[:, 1::2], tgt.t().contiguous().t(), lengths)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    # one target row shared by every row (a stride-0 view)
    shared = run_triton(data, times, tgt[0], lengths)
    torch.testing.assert_close(shared, run_triton(data, times, tgt[0].expand(3, 12).contiguous(), lengths))


def test_interpreter_fused_streams_in_one_launch(poisoned, monkeypatch):
    data, times, lengths, tgt, ref_t = make_case(26, 3, 40, 35, 7, target="grid", time_dtype=torch.float64)
    action = (torch.randn(3, 40, 3) * 2).to(torch.bfloat16)
    gripper = torch.randn(3, 40).half()
    launches = []
    real = triton_impl.kernel

    def counting(interpret):
        fn = real(interpret)

        class Counter:
            def __getitem__(self, grid):
                launches.append(grid)
                return fn[grid]

        return Counter()

    monkeypatch.setattr(triton_impl, "kernel", counting)
    out = resample_streams({"state": data, "action": action, "gripper": gripper}, times, tgt, lengths,
                           backend="triton")
    assert len(launches) == 1
    assert out["gripper"].shape == (3, 35) and out["action"].dtype == torch.bfloat16
    assert rel_err(out["state"], reference(data, times, lengths, ref_t)) < TOL[torch.float32]
    assert rel_err(out["action"], reference(action, times, lengths, ref_t)) < TOL[torch.bfloat16]
    assert rel_err(out["gripper"], reference(gripper, times, lengths, ref_t)) < TOL[torch.float16]


def test_interpreter_empty_and_zero_width():
    times = torch.arange(6, dtype=torch.float32).expand(2, 6).contiguous()
    assert run_triton(torch.zeros(2, 6, 3), times, torch.zeros(2, 0)).shape == (2, 0, 3)
    assert run_triton(torch.zeros(2, 6, 0), times, torch.zeros(2, 4)).shape == (2, 4, 0)
    out = resample_streams([torch.zeros(2, 6, 0), torch.ones(2, 6, 2)], times, torch.zeros(2, 4), backend="triton")
    assert out[0].shape == (2, 4, 0) and torch.equal(out[1], torch.ones(2, 4, 2))


@pytest.mark.parametrize("seed,rate_hz,start_shift", [(41, 7.0, 0.0), (42, 45.0, -0.7), (43, 3.0, 2.5), (44, 60.0, 0.0)])
def test_interpreter_windowed_count_equals_binary_search(poisoned, seed, rate_hz, start_shift):
    """The windowed count (uniform grids) finds exactly the segments the binary search
    finds: down- and upsampling (many or few chunks of samples per block of targets),
    segments that start mid-row (the scalar search), grids starting before or after the
    samples, ragged rows."""
    g = torch.Generator().manual_seed(seed)
    B, S, D = 3, 70, 3
    times = torch.cumsum(torch.rand(B, S, generator=g, dtype=torch.float64) * 0.09 + 0.005, 1)
    lengths = torch.tensor([S, 41, 2])
    data = torch.randn(B, S, D, generator=g)
    grid = UniformGrid(times[:, 0] + start_shift, rate_hz, 50)
    p = prepare([data], ["data"], times, grid, lengths)
    binary = triton_impl.resample(p, config={"BLOCK_T": 16, "STEPS": 1, "WINDOW": False, "BLOCK_S": 16,
                                             "num_warps": 1})[0]
    for steps, block_s in ((1, 16), (3, 8), (4, 32)):
        window = triton_impl.resample(p, config={"BLOCK_T": 16, "STEPS": steps, "WINDOW": True,
                                                 "BLOCK_S": block_s, "num_warps": 1})[0]
        assert not window.isnan().any()
        torch.testing.assert_close(window, binary, rtol=0, atol=0)
    ref = reference(data, times, lengths, start_shift + times[:, :1] + torch.arange(50, dtype=torch.float64) / rate_hz)
    assert rel_err(binary, ref) < TOL[torch.float32]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), S=st.integers(2, 60), T=st.integers(1, 40),
       rate_hz=st.sampled_from([3.0, 20.0, 50.0, 333.0]), shift=st.floats(-1.0, 3.0),
       steps=st.integers(1, 4), block_s=st.sampled_from([8, 16, 32]), f64=st.booleans())
def test_interpreter_windowed_count_property(seed, S, T, rate_hz, shift, steps, block_s, f64):
    """On any uniform grid, windowed counting and binary search pick the same segments:
    the outputs are identical."""
    g = torch.Generator().manual_seed(seed)
    times = torch.cumsum(torch.rand(2, S, generator=g, dtype=torch.float64) * 0.1 + 1e-3, 1)
    times = times if f64 else times.float()
    lengths = torch.tensor([S, int(torch.randint(2, S + 1, (1,), generator=g))])
    p = prepare([torch.randn(2, S, 3, generator=g)], ["data"], times, UniformGrid(times[:, 0] + shift, rate_hz, T),
                lengths)
    binary = triton_impl.resample(p, config={"BLOCK_T": 16, "STEPS": 1, "WINDOW": False, "BLOCK_S": 16,
                                             "num_warps": 1})[0]
    window = triton_impl.resample(p, config={"BLOCK_T": 16, "STEPS": steps, "WINDOW": True, "BLOCK_S": block_s,
                                             "num_warps": 1})[0]
    torch.testing.assert_close(window, binary, rtol=0, atol=0)


def test_kernel_configs_and_row_lengths_it_cannot_take(monkeypatch):
    times = torch.cumsum(torch.rand(2, 20) + 0.1, 1)
    data = torch.randn(2, 20, 3)
    explicit = prepare([data], ["data"], times, times[:, :5] + 0.05, None)
    window = {"BLOCK_T": 16, "STEPS": 1, "WINDOW": True, "BLOCK_S": 16, "num_warps": 1}
    with pytest.raises(ValueError, match="needs a UniformGrid"):
        triton_impl.resample(explicit, config=window)
    with pytest.raises(ValueError, match="lacks STEPS, BLOCK_S"):
        triton_impl.resample(explicit, config={"BLOCK_T": 16, "WINDOW": False, "num_warps": 1})
    monkeypatch.setattr(triton_impl, "MAX_ROW_SAMPLES", 10)
    with pytest.raises(ResampleError, match=r"rows of at most 10 samples .* got S=20; use backend='torch'"):
        run_triton(data, times, times[:, :5] + 0.05)
    # "auto" takes the torch path for such rows instead (wherever it would pick Triton)
    monkeypatch.setattr(api, "resolve_backend", lambda backend, device: "triton" if backend == "auto" else backend)
    torch.testing.assert_close(resample(data, times, times[:, :5] + 0.05, backend="auto"),
                               resample(data, times, times[:, :5] + 0.05, backend="torch"))


def test_interpreter_64_bit_row_offsets(poisoned, monkeypatch):
    """Rows too long for 32-bit offsets take the 64-bit ones: same results."""
    for target in ("explicit", "grid"):
        data, times, lengths, tgt, ref_t = make_case(45, 3, 50, 30, 5, target=target, time_dtype=torch.float64)
        narrow = run_triton(data, times, tgt, lengths)
        with monkeypatch.context() as m:
            m.setattr(triton_impl, "WIDE_REACH", 1)
            p = prepare([data], ["data"], times, tgt, lengths)
            assert triton_impl.kernel_args(p, p.new_outputs())["WIDE"]
            torch.testing.assert_close(run_triton(data, times, tgt, lengths), narrow, rtol=0, atol=0)
        assert rel_err(narrow, reference(data, times, lengths, ref_t)) < TOL[torch.float32]


def test_interpreter_unchecked_bad_lengths_stay_in_bounds(poisoned):
    data, times, _, tgt, _ = make_case(27, 4, 12, 8, 2, ragged=False)
    out = run_triton(data, times, tgt, torch.tensor([0, 1, 12, 99]), check=False)
    assert out.shape == (4, 8, 2)
    assert torch.equal(out[1], data[1, :1].expand(8, 2))  # length 1: hold the only sample
    torch.testing.assert_close(out[3], resample(data, times, tgt, backend="torch")[3])


def test_env_variable_interpreter_in_a_fresh_process(tmp_path):
    """TRITON_INTERPRET=1 set before importing anything also works (the documented way)."""
    script = tmp_path / "interp.py"
    script.write_text(
        "import torch\n"
        "from trajflow.preprocess.kernels import resample, UniformGrid\n"
        "t = torch.cumsum(torch.rand(3, 50, dtype=torch.float64) + 0.1, 1)\n"
        "x = torch.randn(3, 50, 4)\n"
        "g = UniformGrid(t[:, 0], 2.0, 20)\n"
        "a = resample(x, t, g, backend='triton')\n"
        "b = resample(x, t, g, backend='torch')\n"
        "assert (a - b).abs().max() < 1e-5, (a - b).abs().max()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# ---- the CUDA compilation, offline ----------------------------------------------------


class _OfflineCudaDriver:
    """Just enough of a Triton driver for `JITFunction.warmup` to compile for a CUDA
    target without a GPU (triton ships ptxas)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def _offline_driver(arch: int):
    pytest.importorskip("triton.backends.nvidia")
    try:
        from triton.runtime.driver import driver
    except ImportError as exc:  # pragma: no cover - older triton
        pytest.skip(f"this triton has no pluggable driver: {exc}")
    # not reset_active(): that probes for a real GPU; put back exactly what was there
    previous = driver.__dict__.get("_active")
    driver.set_active(_OfflineCudaDriver(arch))
    try:
        yield
    finally:
        driver._active = previous


def _offline_problems():
    g = torch.Generator().manual_seed(0)
    B, S, T = 4, 100, 50
    times = torch.cumsum(torch.rand(B, S, generator=g) + 0.1, 1)
    yield prepare([torch.randn(B, S, 14)], ["data"], times, UniformGrid(times[:, 0], 10.0, T), None)
    yield prepare([torch.randn(B, S, 32).bfloat16()], ["data"], times.double(), torch.rand(B, T).double(),
                  torch.full((B,), S))
    yield prepare([torch.randn(B, S, 7), torch.randn(B, S, 3).half(), torch.randn(B, S, 130).bfloat16(),
                   torch.randn(B, S)],  # D = 1: Triton turns the int 1 into a constant
                  ["a", "b", "c", "d"], times, UniformGrid(times[:, 0].double(), 10.0, T), torch.full((B,), S))


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_kernel_compiles_for_cuda_offline(arch):
    """The JIT path (not the interpreter) compiles to PTX and a cubin for sm_80 and sm_90
    with the argument sets `resample` builds, for both searches and small and large
    block shapes."""
    with triton_impl.jit_mode(False):  # compiled, even under a global TRITON_INTERPRET=1
        jit = triton.jit(triton_impl._resample_kernel)
    with _offline_driver(arch):
        for p in _offline_problems():
            args = triton_impl.kernel_args(p, p.new_outputs())
            configs = [(16, 1, False, 16, 1), (64, 1, False, 16, 4), (256, 1, False, 16, 8)]
            if p.uniform:
                configs += [(16, 4, True, 32, 1), (32, 8, True, 64, 4)]
            for block_t, steps, window, block_s, num_warps in configs:
                compiled = jit.warmup(grid=(1,), BLOCK_T=block_t, STEPS=steps, WINDOW=window, BLOCK_S=block_s,
                                      num_warps=num_warps, enable_fp_fusion=True, **args)
                assert "cubin" in compiled.asm and ".entry" in compiled.asm["ptx"]


def test_contiguous_bf16_rows_get_vector_loads():
    """With a unit D stride and 16-byte rows, the gathers and the store are vector accesses."""
    with triton_impl.jit_mode(False):  # compiled, even under a global TRITON_INTERPRET=1
        jit = triton.jit(triton_impl._resample_kernel)
    B, S, T, D = 8, 100, 50, 32
    times = torch.cumsum(torch.rand(B, S) + 0.1, 1)
    p = prepare([torch.randn(B, S, D).bfloat16()], ["data"], times, UniformGrid(times[:, 0], 10.0, T), None)
    with _offline_driver(90):
        args = triton_impl.kernel_args(p, p.new_outputs())
        for window in (False, True):
            ptx = jit.warmup(grid=(1,), BLOCK_T=64, STEPS=2, WINDOW=window, BLOCK_S=64, num_warps=4,
                             enable_fp_fusion=True, **args).asm["ptx"]
            assert "ld.global.v4" in ptx and "st.global.v4" in ptx


# ---- on a GPU ------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("target", ["explicit", "grid"])
def test_gpu_kernel_matches_reference(dtype, target):
    data, times, lengths, tgt, ref_t = make_case(31, 64, 1025, 300, 14, dtype, target=target, time_dtype=torch.float64)
    dev = torch.device("cuda")
    tgt_d = UniformGrid(tgt.start.to(dev), tgt.rate_hz, tgt.num) if target == "grid" else tgt.to(dev)
    out = resample(data.to(dev), times.to(dev), tgt_d, lengths.to(dev), backend="triton")
    assert out.is_cuda and out.dtype == dtype and not out.isnan().any()
    assert rel_err(out.cpu(), reference(data, times, lengths, ref_t)) < TOL[dtype]
    ref_torch = resample(data.to(dev), times.to(dev), tgt_d, lengths.to(dev), backend="torch")
    torch.testing.assert_close(out, ref_torch, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("target", ["explicit", "grid"])
def test_gpu_every_configuration_matches_reference(target):
    """Whatever the autotuner picks is right: each search and block shape, launched
    directly, against the float64 reference (ragged rows, downsampling)."""
    data, times, lengths, tgt, ref_t = make_case(33, 16, 700, 150, 14, target=target, time_dtype=torch.float64)
    ref = reference(data, times, lengths, ref_t)
    dev = torch.device("cuda")
    tgt_d = UniformGrid(tgt.start.to(dev), tgt.rate_hz, tgt.num) if target == "grid" else tgt.to(dev)
    p = prepare([data.to(dev)], ["data"], times.to(dev), tgt_d, lengths.to(dev))
    tried = 0
    for config in triton_impl._configs():
        if config.kwargs["WINDOW"] and not p.uniform:
            continue
        out = triton_impl.resample(p, config={**config.kwargs, "num_warps": config.num_warps})[0]
        assert rel_err(out.cpu(), ref) < TOL[torch.float32], config
        tried += 1
    assert tried == (len(triton_impl._configs()) if target == "grid" else len(triton_impl._BINARY))


@pytest.mark.gpu
@pytest.mark.parametrize("target", ["explicit", "grid"])
def test_gpu_fused_streams_with_a_one_wide_stream(target):
    """One launch for streams of several widths and dtypes, D = 1 included (Triton makes
    the int 1 a compile-time constant), against the float64 reference."""
    data, times, lengths, tgt, ref_t = make_case(32, 40, 300, 120, 14, target=target, time_dtype=torch.float64)
    dev = torch.device("cuda")
    gripper = torch.randn(40, 300, dtype=torch.float32)
    action = torch.randn(40, 300, 3).bfloat16()
    tgt_d = UniformGrid(tgt.start.to(dev), tgt.rate_hz, tgt.num) if target == "grid" else tgt.to(dev)
    out = resample_streams({"state": data.to(dev), "gripper": gripper.to(dev), "action": action.to(dev)},
                           times.to(dev), tgt_d, lengths.to(dev), backend="triton")
    assert out["gripper"].shape == (40, 120)
    assert rel_err(out["state"].cpu(), reference(data, times, lengths, ref_t)) < TOL[torch.float32]
    assert rel_err(out["gripper"].cpu(), reference(gripper, times, lengths, ref_t)) < TOL[torch.float32]
    assert rel_err(out["action"].cpu(), reference(action, times, lengths, ref_t)) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_batch_beyond_the_grid_y_limit():
    B, S, T, D = 70_000, 8, 3, 2  # more rows than CUDA's 65535 y/z grid limit
    dev = torch.device("cuda")
    times = torch.cumsum(torch.rand(B, S, device=dev) + 0.1, 1)
    data = torch.randn(B, S, D, device=dev)
    grid = UniformGrid(times[:, 0], 1.0, T)
    torch.testing.assert_close(resample(data, times, grid, backend="triton"),
                               resample(data, times, grid, backend="torch"), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_validation_synchronises_once():
    dev = torch.device("cuda")
    data, times, lengths, tgt, _ = make_case(32, 32, 100, 50, 8, target="grid")
    args = (data.to(dev), times.to(dev), UniformGrid(tgt.start.to(dev), tgt.rate_hz, tgt.num), lengths.to(dev))
    resample(*args, backend="triton", check=False)  # autotuning synchronises; do it first
    torch.cuda.synchronize()
    for check, allowed in ((False, 0), (True, 1)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                resample(*args, backend="triton", check=check)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # (torch also warns that the debug mode itself is a prototype: not a synchronisation)
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower() and "prototype" not in str(w.message)]
        assert len(syncs) <= allowed, [str(w.message) for w in syncs]


def test_autotuned_launch_path_without_a_gpu(monkeypatch):
    """Drive the real Autotuner (keys, pruning, the grid callable, launch options) with the
    compiled kernel and its benchmark replaced by fakes."""
    tuner = triton_impl.kernel(False)
    launches = []

    class FakeCompiled:
        def run(self, *args, grid, warmup, **kwargs):  # through the autotuner
            launches.append((grid(kwargs), kwargs))

        def __getitem__(self, grid):  # straight, once the key is tuned
            return lambda **kwargs: launches.append((grid, kwargs))

    benched = []

    def fake_bench(*args, config, **kwargs):
        kw = config.kwargs
        benched.append((kw["BLOCK_T"], kw["STEPS"], kw["WINDOW"]))
        return [0.0 if kw["WINDOW"] and kw["BLOCK_T"] == 64 else 1.0 + kw["BLOCK_T"] / 1000] * 3

    monkeypatch.setattr(tuner, "fn", FakeCompiled())
    monkeypatch.setattr(tuner, "_bench", fake_bench)
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(triton_impl, "_tuned", {})
    times = torch.cumsum(torch.rand(5, 40) + 0.1, 1)
    p = prepare([torch.randn(5, 40, 14)], ["data"], times, UniformGrid(times[:, 0], 10.0, 100), None)
    triton_impl.resample(p, interpret=False)
    triton_impl.resample(p, interpret=False)  # tuned: no second round of benchmarks, no autotuner
    # segments beyond T=100 (rounded to 128) pruned: 8 binary-search and 5 windowed shapes
    assert len(benched) == 13 and sum(w for _, _, w in benched) == 5
    assert max(bt * st for bt, st, _ in benched) == 128
    assert len(launches) == 2
    grid, kw = launches[-1]
    assert (kw["BLOCK_T"], kw["STEPS"], kw["WINDOW"]) == (64, 2, True) and kw["enable_fp_fusion"] is True
    assert grid == (5 * 1,)  # B * cdiv(T, BLOCK_T * STEPS)
    # explicit targets never count in windows; a small T prunes to the blocks that fit it
    benched.clear()
    p = prepare([torch.randn(5, 40, 14)], ["data"], times, torch.rand(5, 100).cumsum(1), None)
    triton_impl.resample(p, interpret=False)
    assert benched and not any(w for _, _, w in benched)
    benched.clear()
    p = prepare([torch.randn(5, 40, 14)], ["data"], times, UniformGrid(times[:, 0], 10.0, 3), None)
    triton_impl.resample(p, interpret=False)
    kw = launches[-1][1]
    assert set(benched) <= {(16, 1, False)} and (kw["BLOCK_T"], kw["STEPS"], kw["WINDOW"]) == (16, 1, False)


def test_tall_batches_are_split_across_launches(poisoned, monkeypatch):
    data, times, lengths, tgt, ref_t = make_case(28, 5, 30, 40, 3, time_dtype=torch.float64)
    expect = run_triton(data, times, tgt, lengths)
    monkeypatch.setattr(triton_impl, "MAX_PROGRAMS", 4)  # 2 rows of 2 T-blocks per launch
    out = run_triton(data, times, tgt, lengths)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    assert rel_err(out, reference(data, times, lengths, ref_t)) < TOL[torch.float32]
