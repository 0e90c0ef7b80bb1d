"""Closed-form correction of a pruned sublayer's output projection: pure fits on moments, and applying them.

A sublayer's output is y = W a + b. After pruning, only the kept units x = a_K remain (in the sequential
variant: computed from the already-pruned model's inputs). Given the moments of (x, target t), every method
returns a new (W_K', b') minimising E‖t − W_K' x − b'‖² within its family:

  none     W_K' = W_K,               b' = b                  (plain slicing)
  bias     W_K' = W_K,               b' = t̄ − W_K x̄         (FLAP-style bias compensation)
  rescale  W_K' = W_K diag(s),       b' = t̄ − W_K' x̄        (one scale per kept unit: KCM's "scale up",
                                                               Kwon's mask tuning; ridge pulls s toward 1)
  lstsq    W_K' = Σ_tx (Σ_xx + λI)⁻¹, b' = t̄ − W_K' x̄        (the least-squares optimum)

so each family contains the previous one and the calibration error never increases down the list.
Non-sequentially, t = W a + b on the dense activations and Σ_tx = W C[:, K], Σ_xx = C[K, K].

Bias-free output projections (Llama, Qwen, Mistral, Gemma: o_proj and down_proj) cannot hold an intercept.
They get the intercept-free fits instead, with *uncentered* moments: lstsq W_K' = E[t xᵀ] (E[x xᵀ] + λI)⁻¹,
rescale likewise; `bias` has nothing to fit there and is refused. We chose this over adding a bias parameter:
the model stays a plain checkpoint of its own architecture (loads without pruneflow, exports unchanged, counts
the same). Issue 14's probe on SmolLM2 (0.7 of the FLOPs, MLP channels only): the centered fit with its
intercept dropped made perplexity ten times worse than no correction; the intercept-free fit halved it. A fit never drops a term silently: write_fit
refuses an intercept for a module without a bias.
"""

from __future__ import annotations

import torch

from pruneflow.adapters import SUBLAYERS, Adapter
from pruneflow.moments import Moments, ridge_eye

METHODS = ("none", "bias", "rescale", "lstsq")


def moments_from_dense(cov: torch.Tensor, mean: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None,
                       keep: torch.Tensor, n: int) -> Moments:
    """Targets are the dense sublayer's own outputs on the dense activations (the non-sequential case)."""
    cov, mean, W = cov.double(), mean.double(), W.double()
    b = torch.zeros(W.shape[0], dtype=torch.float64) if b is None else b.double()
    return Moments(n=n, mean_x=mean[keep], mean_t=W @ mean + b, cov_xx=cov[keep][:, keep],
                   cov_tx=W @ cov[:, keep], cov_tt_trace=float(torch.einsum("dn,nm,dm->", W, cov, W)))


def fit(method: str, m: Moments, W_K: torch.Tensor, b: torch.Tensor | None, ridge: float = 1e-3,
        intercept: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New (W_K', b') for the kept units. W_K: (d, K) the kept columns of the dense projection. With
    intercept=False (a module without a bias) the fit has no intercept and b' is None."""
    W_K = W_K.double()
    if method not in METHODS:
        raise ValueError(f"unknown correction method {method!r}; choose one of {METHODS}")
    if method == "none":
        return W_K, (None if b is None else b.double())
    if not intercept and method == "bias":
        raise ValueError("correct.method=bias fits only a bias, and this model's output projections have none "
                         "(bias-free decoders); use rescale or lstsq (intercept-free fits) or none")
    # Centered moments with an intercept; uncentered (second moments about 0) without one.
    Sxx, Stx = (m.cov_xx, m.cov_tx) if intercept else (m.second_xx, m.second_tx)
    if method == "bias":
        W_new = W_K
    elif method == "rescale":
        # min_s E‖t − W_K diag(s) x‖² + λ‖s − 1‖²  →  (G + λI) s = h + λ1
        G = (W_K.T @ W_K) * Sxx
        h = (W_K * Stx).sum(0)
        R = ridge_eye(G, ridge)
        s = torch.linalg.solve(G + R, h + R.diagonal())
        W_new = W_K * s
    else:  # lstsq
        A = Sxx + ridge_eye(Sxx, ridge)
        W_new = torch.linalg.solve(A, Stx.T).T  # Σ_tx A⁻¹ (A symmetric)
    return W_new, (m.mean_t - W_new @ m.mean_x if intercept else None)


def error(m: Moments, W: torch.Tensor, b: torch.Tensor | None) -> float:
    """Calibration error E‖t − W x − b‖² from the moments alone (b None: no intercept)."""
    W = W.double()
    b = torch.zeros_like(m.mean_t) if b is None else b.double()
    centered = m.cov_tt_trace - 2 * float((W * m.cov_tx).sum()) + float(torch.einsum("dk,kl,dl->", W, m.cov_xx, W))
    bias_err = m.mean_t - W @ m.mean_x - b
    return centered + float(bias_err @ bias_err)


# --- applying fits to a sliced model ----------------------------------------------------------------------

def write_fit(adapter: Adapter, i: int, name: str, W: torch.Tensor, b: torch.Tensor | None) -> None:
    """Put a fitted (W, b) into the sliced model; an emptied sublayer keeps only its bias (= mean output)."""
    with torch.no_grad():
        constant = adapter.constant(i, name)
        if constant is not None:
            if b is not None:
                constant.bias.copy_(b.float())
            return
        lin = adapter.out_proj(i, name)
        if b is not None and lin.bias is None:
            raise ValueError(f"layer {i} {name}: the fit produced an intercept but the output projection has no "
                             f"bias to hold it (use an intercept-free fit for bias-free modules)")
        lin.weight.copy_(W.to(lin.weight.dtype))
        if b is not None:
            lin.bias.copy_(b.to(lin.bias.dtype))


def fit_report(i: int, name: str, m: Moments, W_K, b, W_new, b_new, scale: float | None) -> dict:
    scale = scale or max(m.cov_tt_trace, 1e-12)
    return {"layer": i, "sublayer": name, "kept": int(W_K.shape[1]),
            "rel_error_sliced": error(m, W_K, b) / scale, "rel_error_corrected": error(m, W_new, b_new) / scale}


def correct_from_stats(dense: Adapter, pruned: Adapter, stats, keep: dict[str, list[list[int]]], method: str,
                       ridge: float) -> list[dict]:
    """Non-sequential: targets are the dense sublayer outputs; all moments come from the collected statistics.
    keep: {"attn": kept heads per layer, "ffn": kept neurons per layer} (dense indices)."""
    report = []
    for i in range(dense.num_layers):
        for name in SUBLAYERS:
            st, lin = stats.sublayer(dense, i, name), dense.out_proj(i, name)
            cols = dense.unit_columns(name, keep[name][i])
            W, b = lin.weight.detach(), (lin.bias.detach() if lin.bias is not None else None)
            m = moments_from_dense(st.cov, st.mean, W, b, cols, st.n)
            # An emptied sublayer holds its mean output in a ConstantSublayer bias, which always exists.
            intercept = b is not None or len(cols) == 0
            W_new, b_new = fit(method, m, W[:, cols], b, ridge, intercept)
            report.append(fit_report(i, name, m, W[:, cols], b, W_new, b_new, st.norm_scale))
            write_fit(pruned, i, name, W_new, b_new)
    return report
