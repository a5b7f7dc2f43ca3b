"""A brute-force oracle for tensorized attention, written independently of the library.

Builds each hop as a dense N x N matrix by enumerating coordinates token by token (Python loops,
small sizes only), straight from docs/semantics.md, then multiplies the hops together.
"""

from __future__ import annotations

import math

import torch


def _coords(t: int, dims: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for d in reversed(dims):
        out.append(t % d)
        t //= d
    return tuple(reversed(out))


def _index(c: tuple[int, ...], dims: tuple[int, ...]) -> int:
    t = 0
    for i, d in zip(c, dims):
        t = t * d + i
    return t


def _rope(x: torch.Tensor, pos: int, base: float) -> torch.Tensor:
    d = x.shape[-1]
    half = d // 2
    out = torch.empty_like(x)
    for i in range(half):
        theta = pos * base ** (-2 * i / d)
        c, s = math.cos(theta), math.sin(theta)
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    return out


def hop_keys(query, j, dims, causal, coverage, processed):
    """Coordinates of the keys query (a tuple) sees in a hop along dim j (a set: no duplicates)."""
    keys = set()
    for b in range(dims[j]):
        if causal and b > query[j]:
            continue
        keys.add(query[:j] + (b,) + query[j + 1 :])
    finer = tuple(range(j + 1, len(dims)))
    if causal and coverage == "full" and set(processed) == set(finer):
        last = tuple(dims[i] - 1 for i in finer)
        for b in range(query[j]):
            keys.add(query[:j] + (b,) + last)
    return keys


def effective_matrix(
    q,
    k,
    dims,
    *,
    causal=False,
    coverage="full",
    hop_order=None,
    scale=None,
    rope_base=None,
    valid=None,
    gates=None,
):
    """(H, n, n) effective matrix for one batch element. q (H, n, d), k (Hkv, n, d), float64.

    valid: (n,) bool of kept tokens (default all). Padded/masked positions have zero q and k,
    are keys only once they received a valid key (relays), as docs/semantics.md defines.
    gates: (H, m - 1) hop gates; the i-th hop after the first is then (1 - g) I + g A.
    """
    H, n, d = q.shape
    G = H // k.shape[0]
    m, N = len(dims), math.prod(dims)
    order = list(range(m - 1, -1, -1)) if hop_order is None else list(hop_order)
    scale = 1 / math.sqrt(d) if scale is None else scale
    ok0 = [t < n and (valid is None or bool(valid[t])) for t in range(N)]
    result = torch.zeros(H, n, n, dtype=torch.float64)
    for h in range(H):
        qh = torch.zeros(N, d, dtype=torch.float64)
        kh = torch.zeros(N, d, dtype=torch.float64)
        for t in range(n):
            if ok0[t]:
                qh[t], kh[t] = q[h, t], k[h // G, t]
        M = torch.eye(N, dtype=torch.float64)
        ok = list(ok0)
        processed: list[int] = []
        for i, j in enumerate(order):
            A = torch.zeros(N, N, dtype=torch.float64)
            new_ok = [False] * N
            for t in range(N):
                a = _coords(t, dims)
                keys = [_index(c, dims) for c in hop_keys(a, j, dims, causal, coverage, processed)]
                keys = [u for u in keys if ok[u]]
                if not keys:
                    continue
                new_ok[t] = True
                qa = qh[t] if rope_base is None else _rope(qh[t], a[j], rope_base)
                logits = []
                for u in keys:
                    ku = (
                        kh[u] if rope_base is None else _rope(kh[u], _coords(u, dims)[j], rope_base)
                    )
                    logits.append(float(qa @ ku) * scale)
                p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
                for u, w in zip(keys, p):
                    A[t, u] = w
            if gates is not None and i > 0:
                g = float(gates[h][i - 1])
                A = (1 - g) * torch.eye(N, dtype=torch.float64) + g * A
            M = A @ M
            ok = new_ok
            processed.append(j)
        result[h] = M[:n, :n]
    return result


def kron_reference(q, k, v, dims, scale=None):
    """(A_1 (x) ... (x) A_m) vec(V) for one batch element and head, with A_j from contracted scores."""
    n, d = q.shape
    scale = 1 / math.sqrt(d) if scale is None else scale
    Q, K = q.reshape(*dims, d), k.reshape(*dims, d)
    mats = []
    for j in range(len(dims)):
        Qj = Q.movedim(j, 0).reshape(dims[j], -1)
        Kj = K.movedim(j, 0).reshape(dims[j], -1)
        others = n // dims[j]
        mats.append(torch.softmax(Qj @ Kj.T * scale / others, dim=-1))
    big = mats[0]
    for A in mats[1:]:
        big = torch.kron(big, A)
    return big @ v
