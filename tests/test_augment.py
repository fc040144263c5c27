"""Batched augmentation: shapes, dtypes, seeding, and crops/flips exactly as documented."""

from __future__ import annotations

import torch

from cifarctl import augment as aug


def _images(n: int = 8, dtype=torch.float32) -> torch.Tensor:
    return torch.arange(n * 3 * 32 * 32, dtype=torch.float32).view(n, 3, 32, 32).to(dtype)


def test_random_crop_is_a_translation_of_the_padded_image() -> None:
    """Each crop equals the padded image sliced at some offset in [0, 2p]^2; shape and dtype are kept."""
    x = _images(dtype=torch.bfloat16)
    padded = aug.pad_reflect(x, 2)
    assert padded.shape == (8, 3, 36, 36) and padded.dtype == torch.bfloat16
    crops = aug.random_crop(padded, 32, torch.Generator().manual_seed(0))
    assert crops.shape == x.shape and crops.dtype == x.dtype
    offsets = set()
    for i in range(8):
        found = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(crops[i], padded[i, :, dy:dy + 32, dx:dx + 32])]
        assert found, f"crop {i} is not a translation"
        offsets.add(found[0])
    assert len(offsets) > 1, "offsets should vary across the batch"


def test_pad_reflect_mirrors_the_border() -> None:
    """Reflect padding copies the pixels next to the edge, not the edge itself."""
    x = _images(1)
    padded = aug.pad_reflect(x, 2)
    assert torch.equal(padded[0, :, 2:34, 2:34], x[0])
    assert torch.equal(padded[0, :, 2:34, 0], x[0, :, :, 2])


def test_augmentation_is_seeded() -> None:
    """The same generator seed gives the same crops, flips and cutouts; another seed differs."""
    x = aug.pad_reflect(_images(), 2)

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        out = aug.random_crop(x, 32, g)
        out = aug.flip_where(out, aug.random_flip_mask(len(out), g, out.device))
        return aug.cutout(out, 8, g)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_flip_where_mirrors_exactly_the_masked_images() -> None:
    """Masked images are mirrored left-right, the others untouched."""
    x = _images(4)
    mask = torch.tensor([True, False, True, False])
    out = aug.flip_where(x, mask)
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])
    assert out.shape == x.shape and out.dtype == x.dtype


def test_alternating_flip_flips_each_image_every_other_epoch() -> None:
    """With the alternating flip every image is seen mirrored in exactly one of two consecutive epochs."""
    base = aug.random_flip_mask(100, torch.Generator().manual_seed(0), torch.device("cpu"))
    idx = torch.arange(100)
    e0, e1 = aug.alternating_flip_mask(base, idx, 0), aug.alternating_flip_mask(base, idx, 1)
    assert torch.equal(e0 ^ e1, torch.ones(100, dtype=torch.bool))
    assert torch.equal(aug.alternating_flip_mask(base, idx, 2), e0)


def test_cutout_zeroes_one_square_per_image() -> None:
    """Cutout zeroes at most size x size pixels per image and leaves the rest."""
    x = torch.ones(16, 3, 32, 32)
    out = aug.cutout(x, 8, torch.Generator().manual_seed(0))
    zeroed = (out[:, 0] == 0).sum(dim=(1, 2))
    assert (zeroed > 0).all() and (zeroed <= 81).all()
    assert torch.equal(out[:, 0] == 0, out[:, 2] == 0)


def test_tta_views() -> None:
    """TTA views: none is the batch, flip adds its mirror, flip-translate adds four one-pixel shifts."""
    x = _images(2)
    assert len(aug.tta_views(x, "none")) == 1
    flip = aug.tta_views(x, "flip")
    assert torch.equal(flip[1], x.flip(-1))
    views = aug.tta_views(x, "flip-translate")
    assert len(views) == 6 and all(v.shape == x.shape for v in views)
    assert torch.equal(views[2][..., 1:, 1:], x[..., :-1, :-1])
