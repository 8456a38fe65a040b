"""The evaluation transform shared by the trainer's final evaluation and the server, so that
served predictions equal what the trainer measured (METHOD.md: RGB, resize S x S, CLIP mean/std)."""
from __future__ import annotations

from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torchvision import transforms

CLIP_MEAN = OPENAI_DATASET_MEAN
CLIP_STD = OPENAI_DATASET_STD


def eval_transform(size: int) -> transforms.Compose:
    """PIL image -> normalised float tensor (3, size, size)."""
    return transforms.Compose([
        transforms.Lambda(_to_rgb),
        transforms.Resize((size, size)),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def _to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")
