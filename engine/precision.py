"""Float32 means float32 on a GPU too: TF32 is off for attribution unless asked for.

Why: on Ampere and later GPUs PyTorch runs float32 convolutions in TF32 by default
(``torch.backends.cudnn.allow_tf32`` is True; matrix products are not, unless
``torch.backends.cuda.matmul.allow_tf32`` is set).  TF32 keeps 10 bits of mantissa, a relative
error of about 5e-4 per product instead of float32's 6e-8.  The influence of eq. 6,

    tau(q, i) = -(1/N) g_q^T (G + lambda I)^-1 g_i,

divides each eigen-direction of the K-FAC factors by (a_k b_l + lambda); at the small dampings the
presets use (1e-8 on mnist) the smallest directions are multiplied by up to 1/lambda, so a gradient
error that is harmless to training decides rankings.  The scores are reviewed against float64 on a
CPU (exact to float32 precision), and a GPU must give the same answer: the attribution session turns
TF32 off.  ``ATTRIBUTION_TF32=1`` turns it back on for users who want the speed and accept the
error; ``scripts/gpu_check.py`` measures both on a GPU.  The switches are process-wide, so training
in a process that opened a session (retrain-top, group-retrain, the app's retrain jobs) runs in
float32 too, slower on such a GPU and no less correct; ``train`` alone keeps torch's defaults.
"""

from __future__ import annotations

import os

import torch

TF32_ENV = "ATTRIBUTION_TF32"


def tf32_requested() -> bool:
    """True when ``ATTRIBUTION_TF32`` asks for TF32 (1, true, yes, on)."""
    return os.environ.get(TF32_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def configure_float32(device: torch.device | str) -> bool:
    """Set torch's TF32 switches for attribution on ``device``; returns whether TF32 is allowed.

    Process-wide (torch's switches are global): a CUDA session turns TF32 off for convolutions and
    matrix products alike, unless ``ATTRIBUTION_TF32`` asks for it.  A CPU device changes nothing
    (TF32 does not exist there) and returns False.
    """
    if torch.device(device).type != "cuda":
        return False
    allow = tf32_requested()
    torch.backends.cudnn.allow_tf32 = allow
    torch.backends.cuda.matmul.allow_tf32 = allow
    return allow
