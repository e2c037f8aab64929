"""The official SegGPT pipeline (Painter's SegGPT/SegGPT_inference), transliterated, and promptopt's official mode against it.

Painter's code cannot run here (detectron2, fairscale, timm 0.3.2, a CUDA
checkpoint), so its inference path is written out below from
``seggpt_engine.py`` (``inference_image``, ``run_one_image``,
``inference_video``'s mask rule) and ``models_seggpt.py`` (``forward_encoder``,
``Block.forward``) over transformers' modules (same weights, same submodules:
the embeddings, attention, MLP and decoder are not where the two differ). The
other SegGPT test files import these helpers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
from transformers import SegGptForImageSegmentation  # noqa: E402

from promptopt.backends.seggpt import SegGPTBackend, save_random_model  # noqa: E402
from promptopt.backends.seggpt_codec import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from promptopt.data import bundled_sample_root, load_dataset  # noqa: E402


def painter_input(rgb: np.ndarray, size: int, nearest: bool = False) -> torch.Tensor:
    """seggpt_engine.inference_image: PIL resize, np.array / 255., - imagenet_mean, / imagenet_std, then .float()."""
    img = Image.fromarray(rgb).resize((size, size), Image.NEAREST if nearest else Image.BICUBIC)
    x = (np.array(img) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    return torch.tensor(x).permute(2, 0, 1).float()


def palette_picture(mask: np.ndarray) -> np.ndarray:
    """A binary mask as the official target picture: white foreground on black."""
    return np.repeat((mask > 0).astype(np.uint8)[..., None] * 255, 3, axis=2)


def painter_pred(model, q, im, ms):
    """Painter's SegGPT forward for one prompt set, transliterated over transformers' modules.

    seggpt_engine.run_one_image: ``feat_ensemble = 0 if len(x) > 1 else -1``;
    SegGPT.forward_encoder: ``merge = 1 if merge_idx >= idx else 2`` for every
    ``idx >= merge_between_batch``, the streams merged after block ``merge_idx``,
    normed features of the configured blocks; Block.forward: the ensemble acts
    on the attention output before the residual. (The embeddings and decoder are
    transformers' modules: they are not what differs.)
    """
    cfg = model.config
    n = q.shape[0]
    patches = model.model.embeddings.patch_embeddings.num_patches
    masked = torch.zeros(1, patches, dtype=torch.bool)
    masked[:, patches // 2:] = True
    with torch.no_grad():
        x = model.model.embeddings(torch.cat((im, q), 2), torch.cat((ms, ms), 2), bool_masked_pos=masked,
                                   embedding_type="instance")
        merge_between_batch = 0 if n > 1 else -1
        merge_idx = cfg.merge_index
        out = []
        for idx, blk in enumerate(model.model.encoder.layers):
            merge = 0
            if merge_between_batch >= 0 and idx >= merge_between_batch:
                merge = 1 if merge_idx >= idx else 2
            shortcut = x
            h = blk.attention(blk.layernorm_before(x))[0]
            if merge > 0:
                prompt, inputs = h.split(h.shape[1] // 2, dim=1)
                if merge == 1:
                    num_prompts = h.shape[0] // 2
                    inputs = inputs.reshape(2, num_prompts, -1)
                    inputs = inputs.mean(dim=1, keepdim=True).expand_as(inputs)
                    inputs = inputs.reshape(*prompt.shape)
                else:
                    inputs = inputs.mean(dim=0, keepdim=True).expand_as(inputs)
                h = torch.cat([prompt, inputs], dim=1)
            x = shortcut + h
            x = x + blk.mlp(blk.layernorm_after(x))
            if idx == merge_idx:
                x = (x[: x.shape[0] // 2] + x[x.shape[0] // 2:]) * 0.5
            if idx in cfg.intermediate_hidden_state_indices:
                out.append(model.model.encoder.layernorm(x))
        return model.decoder(torch.cat(out, dim=-1))


def painter_mask(model, prompts, query) -> np.ndarray:
    """The official binary answer for a query: PIL inputs, the forward above, row 0, ``mean(-1) > 128``, nearest resize.

    (inference_video thresholds at model resolution; inference_image resizes the
    picture with ``F.interpolate(mode="nearest")`` — the same pixels either way.)
    """
    size = model.config.image_size[1]
    im = torch.stack([painter_input(p.image, size) for p in prompts])
    ms = torch.stack([painter_input(palette_picture(p.mask), size, nearest=True) for p in prompts])
    q = painter_input(query.image, size).unsqueeze(0).expand(len(prompts), -1, -1, -1)
    pred = painter_pred(model, q, im, ms)
    output = pred[0, :, pred.shape[2] // 2:].permute(1, 2, 0)  # y[0, y.shape[1]//2:] (channel-last)
    std, mean = (torch.tensor(v, dtype=torch.float64) for v in (IMAGENET_STD, IMAGENET_MEAN))  # numpy float64 there
    output = torch.clip((output * std + mean) * 255, 0, 255)
    fg = output.mean(-1).gt(128).float()
    return torch.nn.functional.interpolate(fg[None, None], size=query.size, mode="nearest")[0, 0].numpy().astype(int)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_random_model(tmp_path_factory.mktemp("seggpt-tiny-official"))


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("shots", [1, 3])
def test_official_mode_masks_equal_the_official_pipeline(checkpoint, attention, shots):
    """Issue 13's goal: IoU >= 0.999 per query against the official pipeline (eager: the same pixels)."""
    be = SegGPTBackend.from_pretrained(checkpoint, attention=attention)
    model = SegGptForImageSegmentation.from_pretrained(checkpoint).eval()
    for cat in ("dog", "camel"):
        frames = load_dataset(bundled_sample_root(), category=cat).samples()
        prompts, queries = frames[:shots], frames[shots:shots + 3]
        for q in queries:
            ours = be.predict(prompts, [q], 2)[0].argmax(0).numpy()
            theirs = painter_mask(model, prompts, q)
            assert 0.02 < theirs.mean() < 0.98  # a mask with both classes, not a trivial one
            if attention == "eager":
                assert np.array_equal(ours, theirs)
            inter, union = ((ours == 1) & (theirs == 1)).sum(), ((ours == 1) | (theirs == 1)).sum()
            assert inter / union >= 0.999
