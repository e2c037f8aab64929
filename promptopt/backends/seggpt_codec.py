"""SegGPT's pixel codec: images and masks into the model's input, its painted output back into class probabilities.

Why a module of its own: SegGPT reads and writes *pictures* — a mask is painted
in palette colours, and the answer is a painted image — and the two reference
implementations do the pixel work slightly differently. Both rule sets live
here side by side, each written from the code it follows, and the backend only
says which it uses (``reference``):

``"official"`` — Painter's ``SegGPT/SegGPT_inference/seggpt_engine.py``
    Images are resized with PIL (``Image.resize``, bicubic) to uint8, masks
    (palette pictures) with PIL's ``NEAREST``; then ``/ 255``, ``- mean``,
    ``/ std`` in float64 (numpy there) and cast to float32. A binary mask is read
    back the way the official video path turns a prediction into the next
    frame's prompt: *foreground where the mean of the three channels of the
    clipped [0, 255] picture is > 128* (``output.mean(-1).gt(128)``, computed in
    float64 as there). SegGPT's inference code has no multi-class decoding; for
    more than two classes the nearest palette colour (below) is used in both
    modes.

``"transformers"`` — ``SegGptImageProcessor`` and its ``post_process_semantic_segmentation``
    Images are resized by torch's native uint8 antialiased bicubic kernel (what
    the processor's torchvision resize runs on CPU; it rounds like PIL but is not
    bit-identical to it), masks by ``"nearest-exact"`` (the processor's mapping of
    PIL NEAREST); normalisation is the processor's fused ``(x - 255·mean) /
    (255·std)`` in float32. Decoding: nearest palette colour by squared RGB
    distance in [0, 255] units, with the processor's float32 arithmetic
    (for a binary task: channel mean > 127.5).

Which pixels take which path
    Every non-differentiable input — labelled :class:`~promptopt.data.Sample`
    images and masks, and :class:`~promptopt.backends.base.Context` tensors when
    no gradient is being recorded for them (under ``torch.no_grad``, or tensors
    that do not require grad) — goes through the uint8 rules above; a float
    context is first rounded to uint8 (what saving it as a PNG would do), so a
    context built from a sample preprocesses exactly like the sample. Only a
    context whose tensors require grad while grad is enabled (context tuning)
    takes the differentiable float path, the same in both modes: antialiased
    bicubic in float, clamped to [0, 1] and *not* rounded; masks
    ``"nearest-exact"``.

Probabilities
    Decoding returns soft class probabilities whose argmax is the hard rule
    above: ``softmax(-d_c / (255² · temperature))`` over the squared distances
    ``d_c`` to the palette colours, and for the official binary rule the two-class
    version of the same with the threshold moved from 127.5 to 128
    (``p_fg = sigmoid(6 · (m − 128) / (255 · temperature))``, ``m`` the channel
    mean; ties that float32 cannot separate are broken toward the official
    answer). The softness only matters where probabilities are averaged
    (``ensemble="output"``) or differentiated.
"""

from __future__ import annotations

import functools


import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REFERENCES = ("official", "transformers")


def check_reference(reference: str) -> str:
    """``reference`` itself, or a one-line :class:`ConfigError` naming the choices."""
    if reference not in REFERENCES:
        raise ConfigError(f"seggpt backend: reference must be one of {REFERENCES}, got {reference!r}")
    return reference


@functools.lru_cache(maxsize=64)
def _palette_rows(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    if num_classes < 2:
        raise ConfigError(f"a segmentation task needs at least 2 classes, got {num_classes}")
    labels = num_classes - 1
    base = int(labels ** (1 / 3)) + 1
    margin = 256 // base
    colours = [(0, 0, 0)]
    for loc in range(labels):
        r, g, b = loc // base**2, (loc % base**2) // base, loc % base
        colours.append((255 - r * margin, 255 - g * margin, 255 - b * margin))
    return tuple(colours)


def seggpt_palette(num_classes: int) -> torch.Tensor:
    """(num_classes, 3) float RGB in [0, 255]: class 0 black, then SegGPT's palette for ``num_classes - 1`` labels.

    The colours are those of transformers' ``build_palette(num_labels)`` (from
    Painter's COCO palette): a grid with ``int(L ** (1/3)) + 1`` levels per
    channel counted down from 255. A binary task's class 1 is white.
    """
    return torch.tensor(_palette_rows(num_classes), dtype=torch.float32)


def _differentiable(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class SegGptCodec:
    """Preprocessing and decoding under one ``reference`` rule set (see the module docstring).

    ``input_size`` is the per-image model input (h, w) — half the stacked
    height; ``temperature`` the softness of decoded probabilities.
    """

    def __init__(self, reference: str, input_size: tuple[int, int], temperature: float,
                 device: torch.device | str = "cpu") -> None:
        if temperature <= 0:
            raise ConfigError(f"seggpt backend: temperature must be > 0, got {temperature}")
        self.reference = check_reference(reference)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.temperature = float(temperature)
        self.device = torch.device(device)
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(3, 1, 1)

    # --- uint8 rules (every non-differentiable input) ----------------------------------------------
    def _resize_u8(self, u8: torch.Tensor, nearest: bool) -> torch.Tensor:
        """(3, H, W) uint8 → (3, h, w) uint8 with this reference's resize (CPU)."""
        h, w = self.input_size
        if tuple(u8.shape[-2:]) == (h, w):
            return u8
        if self.reference == "official":
            pil = Image.fromarray(u8.permute(1, 2, 0).contiguous().numpy())  # (H, W, 3) uint8: RGB
            out = pil.resize((w, h), Image.NEAREST if nearest else Image.BICUBIC)
            return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)
        mode = "nearest-exact" if nearest else "bicubic"
        kwargs = {} if nearest else {"antialias": True, "align_corners": False}
        return F.interpolate(u8.unsqueeze(0).contiguous(), size=(h, w), mode=mode, **kwargs)[0]

    def _normalise_u8(self, u8: torch.Tensor) -> torch.Tensor:
        """(3, h, w) uint8 → normalised float32 on the device, with this reference's arithmetic."""
        if self.reference == "official":  # numpy float64 in Painter: img / 255. - mean, / std, then .float()
            x = u8.to(self.device, torch.float64) / 255.0
            mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64, device=self.device).view(3, 1, 1)
            std = torch.tensor(IMAGENET_STD, dtype=torch.float64, device=self.device).view(3, 1, 1)
            return ((x - mean) / std).float()
        # the processor fuses rescale (1/255) into normalise: mean and std are multiplied by 1 / rescale_factor
        scale = 1.0 / (1 / 255)
        mean = (torch.tensor(IMAGENET_MEAN) * scale).to(self.device).view(3, 1, 1)
        std = (torch.tensor(IMAGENET_STD) * scale).to(self.device).view(3, 1, 1)
        return (u8.to(self.device, torch.float32) - mean) / std

    # --- float rules (context tuning) --------------------------------------------------------------
    def normalise(self, x01: torch.Tensor) -> torch.Tensor:
        """(3, h, w) RGB in [0, 1] → normalised (ImageNet mean and std; differentiable)."""
        return (x01 - self._mean) / self._std

    def _resize_float(self, x01: torch.Tensor, nearest: bool) -> torch.Tensor:
        if tuple(x01.shape[-2:]) == self.input_size:
            return x01
        if nearest:
            return F.interpolate(x01.unsqueeze(0), size=self.input_size, mode="nearest-exact")[0]
        return F.interpolate(x01.unsqueeze(0), size=self.input_size, mode="bicubic", align_corners=False,
                             antialias=True)[0].clamp(0.0, 1.0)

    # --- public ------------------------------------------------------------------------------------
    def image(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Normalised (3, h, w) model input of an image.

        ``image`` is an (H, W, 3) uint8 array (a sample) or a (3, H, W) float
        tensor in [0, 1] (a context); see the module docstring for which path it takes.
        """
        if isinstance(image, np.ndarray):
            u8 = torch.from_numpy(np.ascontiguousarray(image, dtype=np.uint8)).permute(2, 0, 1)
            return self._normalise_u8(self._resize_u8(u8, nearest=False))
        if _differentiable(image):
            return self.normalise(self._resize_float(image.to(self.device, torch.float32), nearest=False))
        u8 = image.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).cpu()
        return self._normalise_u8(self._resize_u8(u8, nearest=False))

    @staticmethod
    def mask_to_rgb(mask: torch.Tensor) -> torch.Tensor:
        """(C, H, W) class probabilities → (3, H, W) palette colour in [0, 1] on the mask's device (one-hot: the class colour)."""
        palette = seggpt_palette(mask.shape[0]).to(mask.device) / 255.0
        return torch.einsum("chw,cd->dhw", mask.float(), palette)

    def mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(C, H, W) class probabilities (one-hot for labelled masks, ignore = all-zero) → normalised palette image."""
        if _differentiable(mask):
            return self.normalise(self._resize_float(self.mask_to_rgb(mask.to(self.device)), nearest=True))
        u8 = self.mask_to_rgb(mask.detach().cpu()).mul(255.0).round().clamp(0.0, 255.0).to(torch.uint8)
        return self._normalise_u8(self._resize_u8(u8, nearest=True))

    def decode(self, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
        """(3, h, w) normalised predicted picture → (C, h, w) float32 class probabilities (module docstring)."""
        if self.reference == "official" and num_classes == 2:
            return self._decode_official_binary(pred)
        return self._decode_nearest_colour(pred, num_classes)

    def _decode_nearest_colour(self, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
        # post_process_semantic_segmentation's arithmetic: channel-last, * std + mean, * 255, clip, then
        # squared distances to the palette summed over the channels (float32 throughout)
        std = torch.tensor(IMAGENET_STD, device=pred.device)
        mean = torch.tensor(IMAGENET_MEAN, device=pred.device)
        rgb = torch.clip((pred.float().permute(1, 2, 0) * std + mean) * 255, 0, 255)
        palette = seggpt_palette(num_classes).to(pred.device)
        dist = torch.pow(rgb.unsqueeze(2) - palette.view(1, 1, num_classes, 3), 2).sum(-1)  # (h, w, C)
        return torch.softmax(-dist / (255.0**2 * self.temperature), dim=-1).permute(2, 0, 1)

    def _decode_official_binary(self, pred: torch.Tensor) -> torch.Tensor:
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64, device=pred.device)
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64, device=pred.device)
        rgb = torch.clip((pred.double().permute(1, 2, 0) * std + mean) * 255, 0, 255)
        m = rgb.mean(-1)  # (h, w) float64, as output.mean(-1) in seggpt_engine.py
        z = 6.0 * (m - 128.0) / (255.0 * self.temperature)
        probs = torch.stack([torch.sigmoid(-z), torch.sigmoid(z)]).float()
        # where float32 rounds both to the same value, break the tie as the official rule does (m > 128 wins)
        tie = (m > 128.0) & (probs[1] <= probs[0])
        if bool(tie.any()):
            probs[1] = torch.where(tie, torch.nextafter(probs[0], torch.ones_like(probs[0])), probs[1])
        return probs


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "REFERENCES", "SegGptCodec", "check_reference", "seggpt_palette"]
