"""Mask IoU between promptopt's PerSAM / PerSAM-F and Personalize-SAM's own scripts, on identical weights.

Why: issue 13 asks that ``reference="official"`` reproduce the authors' code
(IoU >= 0.999 per query). No SAM weights can be downloaded here, so both sides
get the *same random weights*: a small SAM is built with the official
``per_segment_anything`` classes (1024 px input and a 64x64 grid as in the
released models, 256-d decoder; only the image encoder is shrunk), its state
dict is renamed onto transformers' ``SamModel``, and the official
``persam.persam`` / ``persam_f.persam_f`` functions run unchanged from a
checkout of github.com/ZrrSkywalker/Personalize-SAM (imported from
``--official``, nothing copied), with small stubs for what this machine lacks
(OpenCV file I/O, CUDA placement, matplotlib figures). promptopt then
predicts the same queries from the same reference in both of its modes.

    git clone https://github.com/ZrrSkywalker/Personalize-SAM /tmp/Personalize-SAM
    OMP_NUM_THREADS=1 python benchmarks/parity_persam_official.py --official /tmp/Personalize-SAM \
        [--categories dog,camel] [--images 6] [--train-epochs 1000] [--json out.json]

Prints, per category and variant, the per-query IoU of promptopt's mask with
the official mask for ``reference="official"`` and ``reference="transformers"``,
and PerSAM-F's learned weights on both sides (``script_weights``: the official script's).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import re
import sys
import tempfile
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from promptopt.backends.persam import PerSAMBackend
from promptopt.data import Sample, bundled_sample_root, load_dataset

_written: dict[str, np.ndarray] = {}


def _install_stubs() -> None:
    """OpenCV's file I/O through PIL (BGR order kept), plotting as no-ops."""
    cv2 = types.ModuleType("cv2")
    cv2.COLOR_BGR2RGB = 4
    cv2.imread = lambda path: np.asarray(Image.open(path).convert("RGB"))[..., ::-1].copy()
    cv2.cvtColor = lambda img, code: img[..., ::-1].copy()

    def imwrite(path, img):
        _written[str(path)] = np.asarray(img).copy()
        return True

    cv2.imwrite = imwrite
    sys.modules.setdefault("cv2", cv2)


class _NoPlot:
    def __getattr__(self, name):
        return lambda *a, **k: None


def official_sam(seed: int):
    """A small SAM from the official classes: 1024 px, 16 px patches (64x64 grid), 256-d decoder."""
    from per_segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    sam = Sam(
        image_encoder=ImageEncoderViT(depth=2, embed_dim=64, img_size=1024, mlp_ratio=4,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=2, patch_size=16,
                                      qkv_bias=True, use_rel_pos=True, global_attn_indexes=[1], window_size=14,
                                      out_chans=256),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                                     mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
            depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3,
            iou_head_hidden_dim=256),
    )
    with torch.no_grad():  # spread the encoder's weights so that features vary across an image
        for p in sam.image_encoder.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return sam.eval()


_RENAMES = [  # official state-dict names -> transformers' SamModel names (checked by a strict load)
    (r"^image_encoder\.", "vision_encoder."), (r"\.blocks\.", ".layers."), (r"\.norm(\d)", r".layer_norm\1"),
    (r"patch_embed\.proj", "patch_embed.projection"), (r"neck\.0", "neck.conv1"), (r"neck\.1", "neck.layer_norm1"),
    (r"neck\.2", "neck.conv2"), (r"neck\.3", "neck.layer_norm2"), (r"\.norm_final_attn", ".layer_norm_final_attn"),
    (r"mask_downscaling\.0", "mask_embed.conv1"), (r"mask_downscaling\.1", "mask_embed.layer_norm1"),
    (r"mask_downscaling\.3", "mask_embed.conv2"), (r"mask_downscaling\.4", "mask_embed.layer_norm2"),
    (r"mask_downscaling\.6", "mask_embed.conv3"), (r"point_embeddings", "point_embed"),
    (r"pe_layer\.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    (r"output_upscaling\.0", "upscale_conv1"), (r"output_upscaling\.1", "upscale_layer_norm"),
    (r"output_upscaling\.3", "upscale_conv2"),
    (r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.0", r"\1.proj_in"),
    (r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.1", r"\1.layers.0"),
    (r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.2", r"\1.proj_out"),
]


def transformers_sam(sam):
    """transformers' SamModel holding exactly the official model's weights."""
    from transformers import SamConfig, SamModel

    cfg = SamConfig(vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       global_attn_indexes=[1], mlp_dim=256, window_size=14, layer_norm_eps=1e-6))
    model = SamModel(cfg).eval()
    state = {}
    for key, value in sam.state_dict().items():
        if key in ("pixel_mean", "pixel_std"):
            continue
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        state[key] = value
    state["shared_image_embedding.positional_embedding"] = state["prompt_encoder.shared_embedding.positional_embedding"]
    model.load_state_dict(state, strict=True)
    return model


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def run_official(module, fn_name: str, sam, root: Path, category: str, extra: dict) -> tuple[list[np.ndarray], list]:
    """Run persam.persam / persam_f.persam_f on one category folder; returns the saved masks (and F's weights)."""
    mod = importlib.import_module(module)
    mod.sam_model_registry = {"vit_h": lambda checkpoint=None: sam}
    mod.plt = _NoPlot()
    mod.show_mask = mod.show_points = lambda *a, **k: None
    learned = []
    if hasattr(mod, "Mask_Weights"):
        base = mod.Mask_Weights if not hasattr(mod.Mask_Weights, "_base") else mod.Mask_Weights._base

        class Recorded(base):  # type: ignore[misc, valid-type]
            _base = base

            def __init__(self):
                super().__init__()
                learned.append(self)

        mod.Mask_Weights = Recorded
    sam.cuda = lambda *a, **k: sam  # the scripts move the model to CUDA; this machine has none
    tensor_cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    _written.clear()
    args = argparse.Namespace(ref_idx="00", sam_type="vit_h", outdir="out", ckpt="", **extra)
    out = root / "outputs"
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            getattr(mod, fn_name)(args, category, str(root / "Images") + "/", str(root / "Annotations") + "/", str(out))
    finally:
        torch.Tensor.cuda = tensor_cuda
        del sam.cuda
    n = len(list((root / "Images" / category).iterdir()))
    masks = [_written[str(out / category / f"{i:02d}.png")][..., 2] > 0 for i in range(n)]
    weights = []
    for m in learned:
        w = m.weights.detach().flatten()
        weights = [round(float(1 - w.sum()), 4), *[round(float(x), 4) for x in w]]
    return masks, weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, help="checkout of ZrrSkywalker/Personalize-SAM")
    ap.add_argument("--data", default=str(bundled_sample_root()))
    ap.add_argument("--categories", default="dog,camel")
    ap.add_argument("--images", type=int, default=6, help="images per category (the first is the reference)")
    ap.add_argument("--train-epochs", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(a.official).resolve()))
    _install_stubs()
    sam = official_sam(a.seed)
    hf = transformers_sam(sam)
    report = []
    for category in a.categories.split(","):
        samples = load_dataset(a.data, category=category).samples(category)[: a.images]
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            (root / "Images" / category).mkdir(parents=True)
            (root / "Annotations" / category).mkdir(parents=True)
            for i, s in enumerate(samples):  # PNG bytes under the script's .jpg names: identical pixels both sides
                Image.fromarray(s.image).save(root / "Images" / category / f"{i:02d}.jpg", format="PNG")
            ref_mask = (samples[0].mask == 1).astype(np.uint8) * 255
            Image.fromarray(np.stack([ref_mask] * 3, -1)).save(root / "Annotations" / category / "00.png")
            ref = Sample(samples[0].id, category, image=samples[0].image, mask=(samples[0].mask == 1).astype(np.int64))
            for variant, module, fn, extra in (
                    ("persam", "persam", "persam", {}),
                    ("persam-f", "persam_f", "persam_f", {"lr": 1e-3, "train_epoch": a.train_epochs, "log_epoch": 10 ** 9})):
                official_masks, official_w = run_official(module, fn, sam, root, category, extra)
                row = {"category": category, "variant": variant, "script_weights": official_w}
                for reference in ("official", "transformers"):
                    be = PerSAMBackend(model=hf, reference=reference, variant=variant, train_steps=a.train_epochs)
                    probs = be.predict([ref], samples, 2)
                    ious = [iou(p.argmax(0).numpy() == 1, m) for p, m in zip(probs, official_masks)]
                    row[reference] = [round(x, 5) for x in ious]
                    if variant == "persam-f":
                        row[f"promptopt_{reference}_weights"] = [round(float(x), 4) for x in be.mask_weights[f"{ref.key}#1"]]
                report.append(row)
                print(json.dumps(row))
    for reference in ("official", "transformers"):
        allv = [x for r in report for x in r[reference]]
        print(f"reference={reference}: mean IoU with the official masks {np.mean(allv):.5f}, min {np.min(allv):.5f}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
