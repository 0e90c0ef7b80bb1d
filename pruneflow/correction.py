"""Closed-form correction of a pruned sublayer's output projection: pure functions on moments.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pruneflow.stats import coarse_mean

METHODS = ("none", "bias", "rescale", "lstsq")


@dataclass
class Moments:
    """Centered second moments of regressors x (K) and targets t (d), float64."""

    n: int
    mean_x: torch.Tensor  # (K,)
    mean_t: torch.Tensor  # (d,)
    cov_xx: torch.Tensor  # (K, K)
    cov_tx: torch.Tensor  # (d, K)
    cov_tt_trace: float  # tr Σ_tt, for error reporting


def moments_from_dense(cov: torch.Tensor, mean: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None,
                       keep: torch.Tensor, n: int) -> Moments:
    """Targets are the dense sublayer's own outputs on the dense activations (the non-sequential case)."""
    cov, mean, W = cov.double(), mean.double(), W.double()
    b = torch.zeros(W.shape[0], dtype=torch.float64) if b is None else b.double()
    return Moments(n=n, mean_x=mean[keep], mean_t=W @ mean + b, cov_xx=cov[keep][:, keep],
                   cov_tx=W @ cov[:, keep], cov_tt_trace=float(torch.einsum("dn,nm,dm->", W, cov, W)))


class MomentAccumulator:
    """Streaming moments of x and t over tokens for the sequential variant: products per batch in float32
    (fast), sums across batches in float64, all around a fixed shift (the first batch's means) so a large
    mean does not cancel the covariance away."""

    def __init__(self) -> None:
        self.n, self.stt = 0, 0.0
        self.shift_x = self.shift_t = self.sx = self.st = self.sxx = self.stx = None

    def add(self, x: torch.Tensor, t: torch.Tensor) -> None:
        x, t = x.float(), t.float()
        if x.shape[0] == 0:
            return
        if self.sx is None:
            f64 = dict(dtype=torch.float64, device=x.device)
            self.shift_x, self.shift_t = coarse_mean(x), coarse_mean(t)
            self.sx, self.st = torch.zeros(x.shape[1], **f64), torch.zeros(t.shape[1], **f64)
            self.sxx, self.stx = torch.zeros(x.shape[1], x.shape[1], **f64), torch.zeros(t.shape[1], x.shape[1], **f64)
        x, t = x - self.shift_x.float(), t - self.shift_t.float()
        self.n += x.shape[0]
        self.sx += x.sum(0).double()
        self.st += t.sum(0).double()
        self.sxx += (x.T @ x).double()
        self.stx += (t.T @ x).double()
        self.stt += float((t.double() ** 2).sum())

    def moments(self) -> Moments:
        n = max(self.n, 1)
        mx, mt = self.sx / n, self.st / n
        return Moments(n=self.n, mean_x=self.shift_x + mx, mean_t=self.shift_t + mt,
                       cov_xx=self.sxx / n - torch.outer(mx, mx), cov_tx=self.stx / n - torch.outer(mt, mx),
                       cov_tt_trace=self.stt / n - float(mt @ mt))


def _ridge_eye(cov: torch.Tensor, ridge: float) -> torch.Tensor:
    k = cov.shape[0]
    lam = ridge * float(cov.diagonal().mean().clamp_min(1e-12)) if k else 0.0
    return lam * torch.eye(k, dtype=cov.dtype)


def fit(method: str, m: Moments, W_K: torch.Tensor, b: torch.Tensor | None, ridge: float = 1e-3
        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New (W_K', b') for the kept units. W_K: (d, K) the kept columns of the dense projection."""
    W_K = W_K.double()
    if method == "none":
        return W_K, (None if b is None else b.double())
    if method == "bias":
        W_new = W_K
    elif method == "rescale":
        # min_s E‖(t−t̄) − W_K diag(s)(x−x̄)‖² + λ‖s − 1‖²  →  (G + λI) s = h + λ1
        G = (W_K.T @ W_K) * m.cov_xx
        h = (W_K * m.cov_tx).sum(0)
        R = _ridge_eye(G, ridge)
        s = torch.linalg.solve(G + R, h + R.diagonal())
        W_new = W_K * s
    elif method == "lstsq":
        A = m.cov_xx + _ridge_eye(m.cov_xx, ridge)
        W_new = torch.linalg.solve(A, m.cov_tx.T).T  # Σ_tx A⁻¹ (A symmetric)
    else:
        raise ValueError(f"unknown correction method {method!r}; choose one of {METHODS}")
    return W_new, m.mean_t - W_new @ m.mean_x


def error(m: Moments, W: torch.Tensor, b: torch.Tensor | None) -> float:
    """Calibration error E‖t − W x − b‖² from the moments alone."""
    W = W.double()
    b = torch.zeros_like(m.mean_t) if b is None else b.double()
    centered = m.cov_tt_trace - 2 * float((W * m.cov_tx).sum()) + float(torch.einsum("dk,kl,dl->", W, m.cov_xx, W))
    bias_err = m.mean_t - W @ m.mean_x - b
    return centered + float(bias_err @ bias_err)
