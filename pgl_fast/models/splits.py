"""Where a network is cut into J local modules.

A split is a list of J half-open unit ranges ``[(start, end), ...]`` covering all units in order.
InfoPro's tables are shipped verbatim as cut entries ``[stage, block]`` ("after this unit, attach a
local loss and cut"); everything else is derived from them or from a documented rule.

Split kinds (``--split``):

- ``infopro``: InfoPro's tables (resnet32 and resnet110, J in 1, 2, 3, 4, 8, 16). The stem is a
  module of its own at resnet32 J=16.
- ``balanced``: InfoPro* balanced-memory tables (resnet110, cifar10-like or stl10, J in 1..4).
- ``layerwise``: one module per unit (J = 3n + 1).
- ``even``: any 1 <= J <= units: J contiguous groups whose sizes differ by at most one, the larger
  groups placed last (memory is front-loaded in these nets, so the cheap low-resolution end takes
  the extra units). It reproduces InfoPro's resnet32 J=4/8/16 and resnet110 J=4/8/16 tables.
- ``auto`` (default): ``infopro`` where the arch has a table, else ``even``.
"""
from __future__ import annotations

from ..errors import UserError
from .cifar_resnet import blocks_per_stage

INFOPRO_CUTS: dict[str, dict[int, list[list[int]]]] = {
    "resnet32": {
        1: [],
        2: [[2, 1]],
        3: [[1, 4], [2, 4]],
        4: [[1, 2], [2, 1], [3, 0]],
        8: [[1, 0], [1, 2], [1, 4], [2, 1], [2, 3], [3, 0], [3, 2]],
        16: [[0, 0], [1, 0], [1, 1], [1, 2], [1, 3], [1, 4], [2, 0], [2, 1], [2, 2], [2, 3],
             [2, 4], [3, 0], [3, 1], [3, 2], [3, 3]],
    },
    "resnet110": {
        1: [],
        2: [[2, 8]],
        3: [[1, 17], [2, 17]],
        4: [[1, 11], [2, 7], [3, 3]],
        8: [[1, 4], [1, 11], [2, 0], [2, 7], [2, 14], [3, 3], [3, 10]],
        16: [[1, 1], [1, 4], [1, 7], [1, 10], [1, 13], [1, 16], [2, 1], [2, 4], [2, 7],
             [2, 11], [2, 15], [3, 1], [3, 5], [3, 9], [3, 13]],
    },
}

# InfoPro* ("--balanced_memory"); keyed by the recipe of the data set.
INFOPRO_BALANCED_CUTS: dict[str, dict[str, dict[int, list[list[int]]]]] = {
    "resnet110": {
        "cifar10": {1: [], 2: [[1, 14]], 3: [[1, 9], [2, 2]], 4: [[1, 6], [1, 14], [2, 8]]},
        "stl10": {1: [], 2: [[1, 14]], 3: [[1, 8], [2, 1]], 4: [[1, 6], [1, 14], [2, 8]]},
    }
}

# torchvision's ImageNet ResNets, K=2 (the only K InfoPro publishes for ImageNet): the first module
# ends after block k of layer2, the 28x28 stage for 224-pixel inputs (k = 0 for ResNet-101, 5 for
# ResNet-152, as InfoPro's ImageNet code sets it). ResNet-50 has no entry in InfoPro's table; it
# gets ResNet-101's cut, since the two share the stem, layer1 and layer2 -- an assumption, not a
# published split (its second module is shorter, so the memory balance differs).
INFOPRO_IMAGENET_CUTS: dict[str, dict[int, list[str]]] = {
    "resnet101": {2: ["layer2.0"]},
    "resnet152": {2: ["layer2.5"]},
    "resnet50": {2: ["layer2.0"]},
}


def imagenet_infopro_cuts(name: str, J: int) -> list[str]:
    """The ``--cuts`` of ``torchvision:<name>`` split as InfoPro splits it on ImageNet."""
    table = INFOPRO_IMAGENET_CUTS.get(name)
    if table is None:
        raise UserError(f"--split infopro for torchvision models has ImageNet splits for "
                        f"{', '.join('torchvision:' + n for n in INFOPRO_IMAGENET_CUTS)} only, not torchvision:{name}; "
                        "name the cuts with --cuts")
    if J not in table:
        raise UserError(f"-J {J} has no InfoPro ImageNet split for torchvision:{name}; supported J: "
                        f"{', '.join(map(str, sorted(table)))} (or name the cuts with --cuts)")
    return list(table[J])


SPLIT_KINDS = ("auto", "infopro", "balanced", "layerwise", "even")


def num_units(arch: str) -> int:
    return 3 * blocks_per_stage(arch) + 1


def _cut_unit(arch: str, stage: int, block: int) -> int:
    n = blocks_per_stage(arch)
    return 0 if stage == 0 else 1 + (stage - 1) * n + block


def cuts_to_ranges(arch: str, cuts: list[list[int]]) -> list[tuple[int, int]]:
    ends = [_cut_unit(arch, s, b) + 1 for s, b in cuts] + [num_units(arch)]
    starts = [0] + ends[:-1]
    return list(zip(starts, ends))


def even_ranges(units: int, J: int) -> list[tuple[int, int]]:
    base, extra = divmod(units, J)
    sizes = [base] * (J - extra) + [base + 1] * extra
    ranges, start = [], 0
    for s in sizes:
        ranges.append((start, start + s))
        start += s
    return ranges


def supported_J(arch: str, kind: str, dataset_recipe: str = "cifar10") -> list[int]:
    if kind == "infopro":
        return sorted(INFOPRO_CUTS.get(arch, {}))
    if kind == "balanced":
        return sorted(INFOPRO_BALANCED_CUTS.get(arch, {}).get(dataset_recipe, {}))
    if kind == "layerwise":
        return [num_units(arch)]
    return list(range(1, num_units(arch) + 1))


def resolve_split(arch: str, J: int, kind: str = "auto", dataset_recipe: str = "cifar10") -> list[tuple[int, int]]:
    """Unit ranges of the J modules, or a UserError naming what is supported."""
    if kind not in SPLIT_KINDS:
        raise UserError(f"--split {kind!r} is not one of {', '.join(SPLIT_KINDS)}")
    U = num_units(arch)
    if kind == "auto":
        kind = "infopro" if arch in INFOPRO_CUTS else "even"
    if kind == "infopro":
        table = INFOPRO_CUTS.get(arch)
        if table is None:
            raise UserError(
                f"--split infopro has tables for {', '.join(INFOPRO_CUTS)} only, not {arch}; use --split even"
            )
        if J not in table:
            raise UserError(
                f"-J {J} has no InfoPro split for {arch}; supported J: {', '.join(map(str, sorted(table)))} "
                f"(or --split even for any J in 1..{U}, --split layerwise for J={U})"
            )
        return cuts_to_ranges(arch, table[J])
    if kind == "balanced":
        by_data = INFOPRO_BALANCED_CUTS.get(arch)
        if by_data is None:
            raise UserError(f"--split balanced has tables for {', '.join(INFOPRO_BALANCED_CUTS)} only, not {arch}")
        table = by_data.get(dataset_recipe)
        if table is None:
            raise UserError(
                f"--split balanced has tables for data sets {', '.join(by_data)} only, not {dataset_recipe}"
            )
        if J not in table:
            raise UserError(
                f"-J {J} has no balanced split for {arch}/{dataset_recipe}; supported J: "
                f"{', '.join(map(str, sorted(table)))}"
            )
        return cuts_to_ranges(arch, table[J])
    if kind == "layerwise":
        if J != U:
            raise UserError(f"--split layerwise makes one module per unit: -J must be {U} for {arch}, got {J}")
        return [(u, u + 1) for u in range(U)]
    if not 1 <= J <= U:
        raise UserError(f"-J {J} is out of range for {arch} with --split even; supported J: 1..{U}")
    return even_ranges(U, J)
