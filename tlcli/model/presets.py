"""Well-known TF2 image feature vectors: name -> handle, input size, feature size, licence, and the
CPU time one image takes, where it was measured.

Every handle takes float32 RGB images in [0, 1] of shape [batch, size, size, 3] and returns
[batch, features]. ``cpu_ms``: milliseconds per image of the frozen backbone through LiteRT (the
CPU extraction engine) on the 2-core development machine, measured by ``bench/backbones.py``
(its output is pasted here); None where that machine does not have the model (it has no
network), never a guess.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    handle: str
    image_size: int
    features: int
    notes: str = ""
    licence: str = "Apache-2.0"
    cpu_ms: float | None = None


_TFHUB = "https://tfhub.dev/google/imagenet"
_BIT = "https://tfhub.dev/google/bit"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("mobilenet_v2_100_224", f"{_TFHUB}/mobilenet_v2_100_224/feature_vector/5", 224, 1280,
               "default; 2.3 M params, 71.8% ImageNet top-1", cpu_ms=21.5),
        Preset("mobilenet_v2_140_224", f"{_TFHUB}/mobilenet_v2_140_224/feature_vector/5", 224, 1792,
               "wider MobileNetV2; 4.4 M params"),
        Preset("mobilenet_v1_025_224", f"{_TFHUB}/mobilenet_v1_025_224/feature_vector/5", 224, 256,
               "tiny; 0.2 M params", cpu_ms=3.1),
        Preset("mobilenet_v3_small_100_224", f"{_TFHUB}/mobilenet_v3_small_100_224/feature_vector/5", 224, 1024,
               "phones; 1.5 M params"),
        Preset("mobilenet_v3_large_100_224", f"{_TFHUB}/mobilenet_v3_large_100_224/feature_vector/5", 224, 1280,
               "4.2 M params, 75.2% ImageNet top-1"),
        Preset("efficientnet_v2_b0", f"{_TFHUB}/efficientnet_v2_imagenet1k_b0/feature_vector/2", 224, 1280,
               "7.1 M params"),
        # Pretrained on ImageNet-21k (14 M images, 21,843 classes): features that transfer
        # better than ImageNet-1k's, at their native input sizes.
        Preset("efficientnet_v2_s_21k", f"{_TFHUB}/efficientnet_v2_imagenet21k_s/feature_vector/2", 384, 1280,
               "EfficientNetV2-S, ImageNet-21k; 22 M params"),
        Preset("efficientnet_v2_m_21k", f"{_TFHUB}/efficientnet_v2_imagenet21k_m/feature_vector/2", 480, 1280,
               "EfficientNetV2-M, ImageNet-21k; 54 M params"),
        # Big Transfer (BiT) ResNet-50x1: -m pretrained on ImageNet-21k, -s on ImageNet-1k. They
        # take any input size; 224 is their pretraining resolution.
        Preset("bit_m_r50x1", f"{_BIT}/m-r50x1/1", 224, 2048, "BiT-M R50x1, ImageNet-21k; 25 M params"),
        Preset("bit_s_r50x1", f"{_BIT}/s-r50x1/1", 224, 2048, "BiT-S R50x1, ImageNet-1k; 25 M params"),
        Preset("inception_v3", f"{_TFHUB}/inception_v3/feature_vector/5", 299, 2048,
               "23.8 M params"),
        Preset("resnet_v2_50", f"{_TFHUB}/resnet_v2_50/feature_vector/5", 224, 2048,
               "25.6 M params"),
    ]
}
