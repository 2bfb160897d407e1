"""About tab: what each method computes and what its sign means, in plain words."""

from __future__ import annotations

import streamlit as st

ABOUT = r"""
### The question
A diffusion model was trained on a set of images. Given one image it generated (or any image), **which
training images made it likely, and which made it unlikely?** The paper *Influence Functions for Scalable
Data Attribution in Diffusion Models* frames this as a counterfactual: *how would a
measurement of the query change if we removed one training image and retrained?*

### The measurement
Every measurement but one is written so that **lower means more likely**: the diffusion training loss of the
query, the negative ELBO (a bound on $-\log p(x)$, in bits per dimension), minus the log-probability of the exact
sampling trajectory, or the loss at one noise level $t$. The exception is the squared norm of the predicted
noise (D-TRAK's surrogate, which D-TRAK scores whatever measurement is chosen): it is **no likelihood**, so its
scores say whether removing an image raises or lowers it, not whether the query becomes more or less likely.

### The sign
An influence score $\tau_i$ estimates the change of the measurement when training image $i$ is removed:

* **Proponent** ($\tau_i > 0$): removing it would *raise* the measurement: for the loss-like ones, make the
  query **less likely**: the image helped the model produce the query.
* **Opponent** ($\tau_i < 0$): removing it would *lower* the measurement: for the loss-like ones, make the
  query **more likely**: the image pulled the model away from the query.

Over the square norm the page's headings say "raises" and "lowers the query's square norm" instead.

Scores are on one scale (the change of the measurement), so a group's effect is approximately the sum of its
members' scores. That is what the LDS evaluation and the retraining check test.

### The methods
**K-FAC Influence** (recommended by the paper). The influence function
$\tau_i = \frac1N \nabla m(q)^\top (G + \lambda I)^{-1} \nabla \ell(x_i)$: the query's gradient, corrected by
the curvature $G$ of the training loss, dotted with each training image's gradient. $G$ is a K-FAC
approximation of the Fisher/GGN (paper eqs. 9-12): one small Kronecker-factored block per layer, so its
inverse is cheap. Training gradients are stored once, rotated into K-FAC's eigenbasis and compressed, so a
query costs one gradient and one pass, and changing the damping $\lambda$ costs only a division.

**TRAK** (Park et al. 2023, adapted to diffusion). The same formula after randomly projecting every gradient
to a few thousand dimensions, with the curvature replaced by the empirical Fisher of the projected
gradients. Cheaper to store, noisier.

**D-TRAK** (Zheng et al. 2024). TRAK with gradients of the squared norm of the model's output in place of the
loss, for both the training images and the query. Empirically competitive, but it does not predict the
change of a likelihood.

**CLIP similarity** and **Pixel similarity**. Not influence: the cosine similarity of the query with each
training image, in CLIP's embedding space or in pixel space (each image centred by its own mean first, so the
pixel score is the correlation of the two images' pixel values). They answer *which training images look
alike?*, a useful nearest-neighbour / memorisation check. **They are not removal predictions**: the columns
show *most similar* and *least similar* instead of proponents and opponents, and their scores are not
summed. CLIP needs pretrained weights, which are never downloaded at run time; its column explains how to
enable it.

### Damping
$\lambda$ regularises the curvature inverse. Small values trust the curvature; large values make the
method behave like a plain gradient dot product. It is on the scale of the mean training loss (the paper's
convention, "normalised by dataset size"). The defaults are the paper's: $10^{-8}$ for K-FAC; for TRAK and
D-TRAK the authors' best values, divided by $N$.

### Monte Carlo samples
The loss is an expectation over noise levels $t$ and noise $\varepsilon$; gradients are averaged over $M$
random draws. All methods share the same draws for a query (common random numbers), so differences between
columns come from the methods, not from noise. Where the training gradients share one set of draws and the
settings say `query_draws = "bank"`, the query takes those same draws: common random numbers between the
query and every training image as well. The shipped mnist model does: on the LDS subsets of its first shipped weights this raised every
gradient method's LDS and K-FAC's label agreement (0.59 to 0.73); it is not the paper's estimator, which
gives the query draws of its own (the timings caption says which one is in use; the README has the figures).
"""


DESCRIBED = ("kfac", "trak", "dtrak", "clip", "pixel")  # the methods the text above explains


def other_methods(method_info: dict[str, dict]) -> str:
    """Markdown for the methods the text above does not explain (one added in one file): each one's own
    title, kind and caption, so that the About tab names every method the other tabs show."""
    rest = {n: v for n, v in method_info.items() if n not in DESCRIBED}
    if not rest:
        return ""
    lines = [f"* **{v['title']}** (`{n}`, {v['kind']}): {v['caption']}" for n, v in rest.items()]
    return "**Other methods in this installation** (their own descriptions):\n\n" + "\n".join(lines)


def about_page(method_info: dict[str, dict] | None = None) -> None:
    st.markdown(ABOUT)
    extra = other_methods(method_info or {})
    if extra:
        st.markdown(extra)
