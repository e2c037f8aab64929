"""From per-class foreground probabilities to a class-probability map (background included).

Why it exists: segmenters that answer "is this pixel the object named by this
prompt?" — CLIPSeg's sigmoid per phrase, SAM's mask logits per box — give one
independent foreground probability ``p_c`` per class, not a distribution over
classes. The rule used throughout (also PerSAM's) is

    background = 1 − max_c p_c,   then (background, p_1, …, p_K) normalised to sum 1.

Its argmax is background unless the best class has ``p_c > 1/2`` (ties go to
background, the lower id); for a binary task it is exactly the usual threshold
of the sigmoid at 0.5 (logit 0), and among classes above 1/2 the most probable
one wins. Another foreground threshold ``t`` (CLIPSeg's authors also report
results at 0.3) scales the background term by ``t / (1 − t)``: the argmax is
then background unless the best ``p_c > t``, and ``t = 0.5`` is the rule above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_probabilities(fg: torch.Tensor, size: tuple[int, int] | None = None, threshold: float = 0.5) -> torch.Tensor:
    """(K, h, w) foreground probabilities → (K+1, H, W) class probabilities (see the module docstring).

    ``size`` resizes the foreground maps first (bilinear, values clamped to [0, 1]);
    ``threshold`` (in (0, 1)) is the foreground probability above which a pixel leaves the background.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"foreground threshold must be in (0, 1), got {threshold}")
    if size is not None and tuple(fg.shape[-2:]) != tuple(size):
        fg = F.interpolate(fg[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]
    fg = fg.float().clamp(0, 1)
    if fg.shape[0] == 0:
        return torch.ones((1, *fg.shape[-2:]), device=fg.device)
    bg = 1 - fg.max(0, keepdim=True).values
    if threshold != 0.5:
        bg = bg * (threshold / (1 - threshold))
    probs = torch.cat([bg, fg])
    return probs / probs.sum(0, keepdim=True).clamp_min(1e-6)


__all__ = ["class_probabilities"]
