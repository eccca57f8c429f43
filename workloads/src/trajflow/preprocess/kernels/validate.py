"""Value checks for ``check=True``: every check runs on the tensors' device and the verdicts
come back to the host in one transfer, so a GPU is synchronised exactly once on the
success path. Only when something is wrong do we spend more transfers to name the first
offending row and sample precisely.
"""
from __future__ import annotations

import torch

from .common import Problem, ResampleError


def _first_bad(mask: torch.Tensor) -> tuple[int, ...]:
    """Index of the first True element of a small boolean tensor (error path only)."""
    return tuple(int(i) for i in mask.nonzero()[0].tolist())


def _nonfinite(x: torch.Tensor) -> torch.Tensor:
    """True where x is NaN or +-inf: two cheap passes (``torch.isfinite`` takes five)."""
    return (x - x) != 0


def check_values(p: Problem) -> None:
    """Raise ResampleError naming the first bad row, or return having synced once.

    Data finiteness is screened through per-sample sums over D (NaN and inf propagate);
    a row flagged only because finite values overflowed the float32 sum (|x| ~ 1e37) is
    re-checked exactly, which costs extra synchronisations in that case only.
    """
    if p.B == 0:
        return
    dev = p.device
    S = p.S
    valid = None  # [B, S] bool: sample s of row b is within lengths[b]
    names: list[str] = []
    rows: list[torch.Tensor] = []  # each [B] bool: row b fails this check

    if p.lengths is not None:
        L = p.lengths
        names.append("lengths")
        rows.append((L < 2) | (L > S))
        valid = torch.arange(S, device=dev)[None, :] < L[:, None]

    # Valid samples must be finite and each after the one before (NaN fails every
    # comparison). Compared, not subtracted: the step between two finite times can overflow.
    times_bad = _nonfinite(p.times)
    times_bad[:, 1:] |= ~(p.times[:, 1:] > p.times[:, :-1])
    if valid is not None:
        times_bad &= valid
    names.append("times")
    rows.append(times_bad.any(1))

    if p.targets is not None:
        names.append("targets")
        rows.append(_nonfinite(p.targets).any(1))
    else:
        names.append("start")
        rows.append(_nonfinite(p.start))

    for k, x in enumerate(p.streams):
        bad_x = _nonfinite(x.sum(2, dtype=torch.float32))
        if valid is not None:
            bad_x &= valid
        names.append(f"data{k}")
        rows.append(bad_x.any(1))

    bad = torch.stack(rows)  # [C, B]
    count = bad.sum(1)
    first = torch.where(count > 0, bad.to(torch.uint8).argmax(1), -1)
    verdict = torch.stack([first, count]).tolist()  # the one sync
    for c, name in enumerate(names):
        r, n = verdict[0][c], verdict[1][c]
        if r < 0:
            continue
        if name.startswith("data"):
            # exact re-check (the sum screen can overflow for huge finite values)
            x = p.streams[int(name[4:])]
            exact = (~torch.isfinite(x)).any(2)
            if valid is not None:
                exact &= valid
            exact = exact.any(1)
            n = int(exact.sum())
            if n == 0:
                continue
            r = int(exact.to(torch.uint8).argmax())
        msg = _describe(p, name, r)
        if n > 1:
            msg += f" ({n} rows fail this check)"
        raise ResampleError(msg)


def _describe(p: Problem, name: str, r: int) -> str:
    S = p.S
    L = int(p.lengths[r]) if p.lengths is not None else S
    if name == "lengths":
        if L < 2:
            return f"row {r}: length {L} < 2: a row needs at least 2 valid samples to interpolate"
        return f"row {r}: length {L} > S={S}, the number of samples in the tensor"
    t = p.times[r, :L]
    if name == "times":
        if not bool(torch.isfinite(t).all()):
            (s,) = _first_bad(~torch.isfinite(t))
            return f"row {r}: times[{r}, {s}] is {t[s].item()} (times must be finite within the valid samples)"
        (s,) = _first_bad(t[1:] <= t[:-1])
        a, b = t[s].item(), t[s + 1].item()
        what = "duplicates" if a == b else "is before"
        return (
            f"row {r}: times must be strictly increasing, but times[{r}, {s + 1}] = {b!r} {what} "
            f"times[{r}, {s}] = {a!r}"
        )
    if name == "targets":
        (j,) = _first_bad(~torch.isfinite(p.targets[r]))
        return f"row {r}: target time [{r}, {j}] is {p.targets[r, j].item()} (target times must be finite)"
    if name == "start":
        return f"row {r}: UniformGrid.start is {p.start[r].item()} (it must be finite)"
    k = int(name[len("data"):])
    x = p.streams[k][r, :L]
    s, d = _first_bad(~torch.isfinite(x))
    label = p.labels[k]
    idx = f"[{r}, {s}]" if p.squeezed[k] else f"[{r}, {s}, {d}]"
    return (
        f"row {r}: {label}{idx} is {x[s, d].item()} (data must be finite within the valid samples; "
        "padding beyond lengths may hold anything)"
    )
