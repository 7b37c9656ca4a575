"""Well-known TF Hub image feature vectors: name -> handle, input size, feature size.

Every handle takes float32 RGB images in [0, 1] of shape [batch, size, size, 3] and returns
[batch, features].
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    handle: str
    image_size: int
    features: int
    notes: str = ""


_TFHUB = "https://tfhub.dev/google/imagenet"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("mobilenet_v2_100_224", f"{_TFHUB}/mobilenet_v2_100_224/feature_vector/5", 224, 1280,
               "default; 2.3 M params, 71.8% ImageNet top-1"),
        Preset("mobilenet_v2_140_224", f"{_TFHUB}/mobilenet_v2_140_224/feature_vector/5", 224, 1792,
               "wider MobileNetV2; 4.4 M params"),
        Preset("mobilenet_v1_025_224", f"{_TFHUB}/mobilenet_v1_025_224/feature_vector/5", 224, 256,
               "tiny; 0.2 M params"),
        Preset("mobilenet_v3_small_100_224", f"{_TFHUB}/mobilenet_v3_small_100_224/feature_vector/5", 224, 1024,
               "phones; 1.5 M params"),
        Preset("mobilenet_v3_large_100_224", f"{_TFHUB}/mobilenet_v3_large_100_224/feature_vector/5", 224, 1280,
               "4.2 M params, 75.2% ImageNet top-1"),
        Preset("efficientnet_v2_b0", f"{_TFHUB}/efficientnet_v2_imagenet1k_b0/feature_vector/2", 224, 1280,
               "7.1 M params"),
        Preset("inception_v3", f"{_TFHUB}/inception_v3/feature_vector/5", 299, 2048,
               "23.8 M params"),
        Preset("resnet_v2_50", f"{_TFHUB}/resnet_v2_50/feature_vector/5", 224, 2048,
               "25.6 M params"),
    ]
}

