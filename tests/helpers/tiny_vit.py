"""A tiny ViT-like base for `adapt-teacher --base helpers.tiny_vit:build` (tests put tests/ on sys.path)."""
from distill.models.vit import VisionTransformer


def build():
    return VisionTransformer(num_classes=7, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
