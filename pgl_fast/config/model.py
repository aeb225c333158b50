"""Which network a run trains and how it is cut into local modules."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..models.cifar_resnet import blocks_per_stage
from ..models.splits import SPLIT_KINDS, imagenet_infopro_cuts
from .base import _f, bad


@dataclass(kw_only=True)
class ModelConfig:
    arch: str = _f("resnet32", "CIFAR ResNet-(6n+2) (resnet20, resnet32, resnet56, resnet110, ...) or torchvision:<name> (e.g. torchvision:resnet18, torchvision:vgg11_bn, torchvision:mobilenet_v2; cut with --cuts)", group="model")
    model: str | None = _f(None, "a user's network instead of --arch: package.module:factory, called as factory(num_classes=N), returning an nn.Module whose top-level children run in order (or an nn.Sequential); cut with --cuts", group="model", metavar="MODULE:FACTORY")
    cuts: str | None = _f(None, "with --arch torchvision:<name> or --model: comma-separated children to cut after (child names such as layer1,layer2,layer3, features.7 inside a Sequential child, or indices of an nn.Sequential); J = cuts + 1", group="model")
    cifar_stem: bool = _f(False, "with --arch torchvision:<ResNet>: replace the stem by a 3x3 stride-1 conv without max-pool, the usual change for 32x32 inputs", group="model")
    modules: int = _f(16, "J, the number of local modules (InfoPro: --local_module_num)", flags=("-J", "--modules"), group="model", metavar="J")
    split: str = _f("auto", "how the network is cut: InfoPro's tables, balanced-memory (InfoPro*), layerwise or even", group="model", choices=SPLIT_KINDS)
    droprate: float = _f(0.0, "dropout inside BasicBlocks (InfoPro uses 0)", group="model")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Everything the model fields alone decide. A model cut by --cuts gets its J from them
        (and ``--split infopro`` of a torchvision ResNet becomes that table's --cuts list)."""
        if self.model is not None and self.arch.startswith("torchvision:"):
            bad("--model", f"names a network, and so does --arch {self.arch}; give one of them")
        if self.cifar_stem and not self.arch.startswith("torchvision:"):
            bad("--cifar-stem", "changes the stem of a torchvision ResNet: use it with --arch torchvision:<name>")
        if self.custom_model:
            self._resolve_cuts()
        else:
            if self.cuts is not None:
                bad("--cuts", f"applies to --arch torchvision:<name> and --model; {self.arch} is cut by -J and --split")
            try:
                blocks_per_stage(self.arch)
            except ValueError as e:
                raise UserError(str(e) + " or torchvision:<name>") from None
            if self.modules < 1:
                bad("-J/--modules", f"must be >= 1, got {self.modules}")
        if not 0.0 <= self.droprate < 1.0:
            bad("--droprate", f"must be in [0, 1), got {self.droprate}")

    def _resolve_cuts(self) -> None:
        """A torchvision model or a user's factory: its cuts, and J from them."""
        if self.arch.startswith("torchvision:") and not self.arch.split(":", 1)[1]:
            bad("--arch", "torchvision: needs a model name, e.g. torchvision:resnet18")
        if self.split == "infopro" and self.model is None:
            if self.cuts is not None:
                bad("--cuts", "and --split infopro both set the cuts; give one of them")
            # the ImageNet ResNets' module split as a --cuts list (J is checked there)
            self.cuts = ",".join(imagenet_infopro_cuts(self.arch.split(":", 1)[1], self.modules))
            self.split = "auto"
        if not self.cut_list:
            bad("--cuts", "is required with --arch torchvision:<name> or --model: name the children to cut "
                "after, e.g. --cuts layer1,layer2,layer3")
        if self.modules not in (16, len(self.cut_list) + 1):
            bad("-J/--modules", f"--cuts makes {len(self.cut_list) + 1} modules; -J {self.modules} disagrees "
                "(drop -J)")
        self.modules = len(self.cut_list) + 1
        if self.split != "auto":
            bad("--split", "chooses among the CIFAR ResNets' split tables; --cuts sets the split of this model")

    @property
    def custom_model(self) -> bool:
        """A torchvision model or a user's factory, cut by --cuts (not a CIFAR ResNet preset)."""
        return self.model is not None or self.arch.startswith("torchvision:")

    @property
    def cut_list(self) -> list[str]:
        return [c.strip() for c in (self.cuts or "").split(",") if c.strip()]
