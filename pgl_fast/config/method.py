"""How a run learns: the method, its aux heads, and each method's own options (PGL's period and
local objective, MAN's aux path, InfoPro's loss and lambdas, HPFF's paths)."""
from __future__ import annotations

from dataclasses import dataclass

from ..core.methods import HPFF_LAMBDAS, METHODS as METHOD_CLASSES, local_objectives
from ..models.heads import AUX_CONFIGS, HEADS
from .base import _f, bad


class _PglLocals:
    """--pgl-local's choices, read from the method registry when asked (a method registered after
    import is one), in registry order."""

    def __contains__(self, name) -> bool:
        return name in local_objectives()

    def __iter__(self):
        return iter(local_objectives())


# the registry's names, live (register_method adds to them)
METHODS = METHOD_CLASSES.keys()
# --pgl-local: every registered method whose epochs are all local
PGL_LOCALS = _PglLocals()
MAN_BASES = ("dgl", "infopro")
LAMBDA_FIELDS = ("ixx_1", "ixy_1", "ixx_2", "ixy_2")

# InfoPro's per-run lambda endpoints (ixx_1, ixy_1, ixx_2, ixy_2), as its published run commands set
# them per data set, network, J and balanced-memory split.
INFOPRO_LAMBDAS = {
    ("cifar10", "resnet32", 2, False): (5, 1, 0, 0),
    ("cifar10", "resnet32", 4, False): (6, 0, 1, 2),
    ("cifar10", "resnet32", 8, False): (5, 0, 0, 2),
    ("cifar10", "resnet32", 16, False): (5, 0.05, 0.2, 0.5),
    ("cifar10", "resnet110", 2, False): (5, 0.5, 0, 0),
    ("cifar10", "resnet110", 4, False): (1, 0, 0, 1),
    ("cifar10", "resnet110", 8, False): (5, 0, 0, 1),
    ("cifar10", "resnet110", 16, False): (5, 0, 0.5, 1),
    ("cifar10", "resnet110", 2, True): (5, 0.1, 0, 0),
    ("cifar10", "resnet110", 3, True): (5, 0, 5, 0.1),
    ("cifar10", "resnet110", 4, True): (5, 0, 5, 0.1),
    ("stl10", "resnet110", 2, False): (10, 1, 0, 0),
    ("stl10", "resnet110", 4, False): (20, 0.2, 5, 2),
    ("stl10", "resnet110", 8, False): (20, 0.2, 5, 1),
    ("stl10", "resnet110", 16, False): (20, 0.5, 10, 0.1),
    ("stl10", "resnet110", 2, True): (20, 1, 0, 0),
    ("stl10", "resnet110", 3, True): (20, 0.5, 5, 2),
    ("stl10", "resnet110", 4, True): (20, 0.5, 10, 1),
    ("svhn", "resnet110", 2, False): (1, 0.1, 0, 0),
    ("svhn", "resnet110", 4, False): (5, 0, 0.5, 1),
    ("svhn", "resnet110", 8, False): (5, 0, 0.5, 2),
    ("svhn", "resnet110", 16, False): (5, 0.2, 0.5, 1),
}


@dataclass(kw_only=True)
class MethodConfig:
    method: str = _f("pgl", "training method", group="method", choices=METHODS)
    aux: str = _f("1c2f", "aux head (InfoPro: --aux_net_config); adapt = AUX-ADAPT", group="method", choices=AUX_CONFIGS)
    aux_widen: float = _f(1.0, "aux head width multiplier (InfoPro: --aux_net_widen)", group="method")
    aux_feature_dim: int = _f(128, "aux head hidden/feature dim (InfoPro: --aux_net_feature_dim)", group="method")
    period: int = _f(10, "PGL: P local epochs per cycle", flags=("-P", "--period"), group="method", metavar="P")
    duration: int = _f(2, "PGL: Q global epochs after every P local ones", flags=("-Q", "--duration"), group="method", metavar="Q")
    pgl_local: str = _f("dgl", "PGL: the local objective of its local epochs (and of the heads in its global ones)", group="method", choices=PGL_LOCALS)
    man_momentum: float = _f(0.995, "MAN: momentum of the EMA copy of module j+1's first block on module j's aux path (MAN's published runs: 0.995)", group="method")
    man_base: str = _f("dgl", "MAN: the loss on its aux path: dgl = cross-entropy head (DGL+MAN), infopro = InfoPro's (InfoPro+MAN; InfoPro's flags apply)", group="method", choices=MAN_BASES)
    infopro_loss: str = _f("contrast", "InfoPro's task term (InfoPro: --local_loss_mode): contrast = SupCon, softmax = CE. InfoPro published lambda defaults only for contrast; softmax reuses that table unless --ixx-*/--ixy-* are given (the lambdas used are recorded in header.json)", group="method", choices=("contrast", "softmax"))
    ixx_1: float | None = _f(None, "InfoPro lambda_1 (reconstruction) of the first local module (default: InfoPro's per-run value, published for the contrast loss only)", group="method")
    ixy_1: float | None = _f(None, "InfoPro lambda_2 (task) of the first local module", group="method")
    ixx_2: float | None = _f(None, "InfoPro lambda_1 of module J-1", group="method")
    ixy_2: float | None = _f(None, "InfoPro lambda_2 of module J-1", group="method")
    hpff_base: str = _f("infopro", "HPFF: the loss of its cascade path: infopro (softmax task term of a second head plus patch-decoded reconstruction, lambdas --ixx-*/--ixy-*, default HPFF's published 5, 0.5 -> 0, 0) or dgl (cross-entropy of the second head)", group="method", choices=("infopro", "dgl"))
    hpff_wx: float = _f(0.001, "HPFF: weight of the independent path's loss (each module on its detached input)", group="method")
    hpff_wy: float = _f(0.999, "HPFF: weight of the cascade path's loss (modules j-1 and j together)", group="method")
    hpff_patches: int = _f(2, "HPFF: the patch decoders cut features and image into N x N tiles", group="method", metavar="N")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Everything the method fields alone decide; HPFF's default lambdas are filled in here
        (InfoPro's depend on the data set and network: the composed config resolves those)."""
        if self.method not in METHODS:
            bad("--method", f"{self.method!r} is not one of {', '.join(METHODS)}")
        if self.aux not in AUX_CONFIGS:
            bad("--aux", f"{self.aux!r} is not one of {', '.join(AUX_CONFIGS)}")
        if self.pgl_local not in PGL_LOCALS:
            bad("--pgl-local", f"{self.pgl_local!r} is not one of {', '.join(PGL_LOCALS)}")
        if self.man_base not in MAN_BASES:
            bad("--man-base", f"{self.man_base!r} is not one of {', '.join(MAN_BASES)}")
        if not 0.0 <= self.man_momentum <= 1.0:
            bad("--man-momentum", f"must be in [0, 1], got {self.man_momentum}")
        if self.uses_infopro and not HEADS[self.aux].infopro:
            *first, last = [name for name, head in HEADS.items() if head.infopro]
            bad("--aux", f"InfoPro uses InfoPro's AuxClassifier heads: {', '.join(first)} or {last}")
        if self.period < 1:
            bad("-P/--period", f"must be >= 1, got {self.period}")
        if self.duration < 0:
            bad("-Q/--duration", f"must be >= 0, got {self.duration}")
        if self.aux_widen <= 0:
            bad("--aux-widen", f"must be > 0, got {self.aux_widen}")
        if self.aux_feature_dim < 1:
            bad("--aux-feature-dim", f"must be >= 1, got {self.aux_feature_dim}")
        if self.uses_hpff:
            self._check_hpff()

    def _check_hpff(self) -> None:
        if not (self.hpff_wx >= 0 and self.hpff_wy >= 0 and self.hpff_wx + self.hpff_wy > 0):
            bad("--hpff-wx/--hpff-wy", f"must be >= 0 and not both 0, got {self.hpff_wx} and {self.hpff_wy}")
        if self.hpff_patches < 1:
            bad("--hpff-patches", f"must be >= 1, got {self.hpff_patches}")
        if self.hpff_base == "infopro":
            for name, v in zip(LAMBDA_FIELDS, HPFF_LAMBDAS):
                if getattr(self, name) is None:
                    setattr(self, name, float(v))

    @property
    def local_objectives(self) -> tuple[str, ...]:
        """The local objectives this run trains with: ``--method``'s own, PGL's ``--pgl-local``, and
        under MAN its ``--man-base`` (empty for bp)."""
        name = self.pgl_local if self.method == "pgl" else self.method
        if name == "bp":
            return ()
        return (name, self.man_base) if name == "man" else (name,)

    @property
    def uses_infopro(self) -> bool:
        return "infopro" in self.local_objectives

    @property
    def uses_infopro_lambdas(self) -> bool:
        """InfoPro's lambdas (--ixx-*/--ixy-*) weigh a loss of this run: InfoPro's own, or the
        InfoPro base of HPFF's cascade (whose task term is always softmax: ``uses_infopro`` stays
        False there, so InfoPro's other flags and head limits do not apply)."""
        return self.uses_infopro or self.uses_hpff and self.hpff_base == "infopro"

    @property
    def uses_man(self) -> bool:
        return "man" in self.local_objectives

    @property
    def uses_hpff(self) -> bool:
        """HPFF is the local objective: ``--method hpff``, or PGL over it."""
        return "hpff" in self.local_objectives
