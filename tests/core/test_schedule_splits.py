"""Schedules against hand-written epoch tables; splits and parameter counts against prior-art."""
import pytest

from pgl_fast.models.presets import cifar_resnet
from pgl_fast.core.methods import BP, DGL, PGL, InfoPro
from pgl_fast.core.schedule import lr_at_epoch
from pgl_fast.errors import UserError
from pgl_fast.models.splits import resolve_split

L, G = "local", "global"


@pytest.mark.parametrize("P,Q,E,expected", [
    (1, 1, 2, [L, G]),
    (3, 1, 9, [L, L, L, G, L, L, L, G, L]),
    (2, 2, 7, [L, L, G, G, L, L, G]),
    (1, 2, 7, [L, G, G, L, G, G, L]),
    (4, 0, 5, [L, L, L, L, L]),
    (5, 3, 10, [L, L, L, L, L, G, G, G, L, L]),
])
def test_pgl_phase_table(P, Q, E, expected):
    # the method object the learner asks agrees with the table
    assert PGL(P, Q).phases(E) == expected


def test_paper_default_cycle():
    t = PGL(10, 2).phases(160)
    # 13 full cycles of 12 epochs = 156 epochs with 26 global ones, then 4 local epochs
    assert t.count(G) == 26
    assert t[10:12] == [G, G] and t[:10] == [L] * 10
    assert t[-4:] == [L] * 4 and t[154:156] == [G, G]


def test_other_methods_phase():
    assert DGL().phases(3) == InfoPro().phases(3) == [L] * 3
    assert BP().phases(3) == [G] * 3


@pytest.mark.parametrize("e,lr0,expected", [
    (1, 0.8, 0.0100), (2, 0.8, 0.0890), (5, 0.8, 0.3252), (10, 0.8, 0.7141), (11, 0.8, 0.7907),
    (40, 0.8, 0.6828), (80, 0.8, 0.4000), (120, 0.8, 0.1172), (159, 0.8, 0.00008), (160, 0.8, 0.0),
    (1, 0.1, 0.0100), (2, 0.1, 0.0190), (5, 0.1, 0.0459), (10, 0.1, 0.0901), (11, 0.1, 0.0988),
    (80, 0.1, 0.0500), (160, 0.1, 0.0),
])
def test_infopro_cosine_warmup_table(e, lr0, expected):
    # values from prior-art §7.2 (InfoPro --cos_lr), 1-based epoch e
    got = lr_at_epoch(e - 1, base_lr=lr0, epochs=160, sched="infopro-cosine", warmup_epochs=10, warmup_lr=0.01)
    assert got == pytest.approx(expected, abs=6e-5)


def test_cosine_without_warmup_and_step():
    assert lr_at_epoch(0, base_lr=1.0, epochs=4, sched="infopro-cosine") == pytest.approx(0.5 * (1 + 0.7071067811865476))
    assert lr_at_epoch(3, base_lr=1.0, epochs=4, sched="infopro-cosine") == pytest.approx(0.0)
    # plain cosine: 1.0, 0.8536, 0.5, 0.1464 -- the last epoch still trains
    got = [lr_at_epoch(e, base_lr=1.0, epochs=4, sched="cosine") for e in range(4)]
    assert got == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466])
    assert lr_at_epoch(5, base_lr=1.0, epochs=10, sched="step", milestones=(5, 8)) == pytest.approx(0.1)


# prior-art §4.3: inclusive global unit ranges per module
MEMBERSHIP = {
    ("resnet32", 2): [(0, 7), (8, 15)],
    ("resnet32", 3): [(0, 5), (6, 10), (11, 15)],
    ("resnet32", 4): [(0, 3), (4, 7), (8, 11), (12, 15)],
    ("resnet32", 8): [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15)],
    ("resnet32", 16): [(i, i) for i in range(16)],
    ("resnet110", 2): [(0, 27), (28, 54)],
    ("resnet110", 3): [(0, 18), (19, 36), (37, 54)],
    ("resnet110", 4): [(0, 12), (13, 26), (27, 40), (41, 54)],
    ("resnet110", 8): [(0, 5), (6, 12), (13, 19), (20, 26), (27, 33), (34, 40), (41, 47), (48, 54)],
    ("resnet110", 16): [(0, 2), (3, 5), (6, 8), (9, 11), (12, 14), (15, 17), (18, 20), (21, 23), (24, 26),
                        (27, 30), (31, 34), (35, 38), (39, 42), (43, 46), (47, 50), (51, 54)],
}


@pytest.mark.parametrize("key", sorted(MEMBERSHIP))
def test_infopro_split_membership(key):
    arch, J = key
    got = [(a, b - 1) for a, b in resolve_split(arch, J, "infopro")]
    assert got == MEMBERSHIP[key]


@pytest.mark.parametrize("recipe,J,expected", [
    ("cifar10", 2, [(0, 15), (16, 54)]),
    ("cifar10", 3, [(0, 10), (11, 21), (22, 54)]),
    ("cifar10", 4, [(0, 7), (8, 15), (16, 27), (28, 54)]),
    ("stl10", 3, [(0, 9), (10, 20), (21, 54)]),
])
def test_balanced_splits(recipe, J, expected):
    assert [(a, b - 1) for a, b in resolve_split("resnet110", J, "balanced", recipe)] == expected


def test_even_rule_and_layerwise():
    assert resolve_split("resnet56", 5, "auto") == [(0, 5), (5, 10), (10, 16), (16, 22), (22, 28)]  # 28 units: 5,5,6,6,6
    assert len(resolve_split("resnet110", 55, "layerwise")) == 55
    # the even rule agrees with InfoPro's tables where they are themselves even
    for arch, J in [("resnet32", 4), ("resnet32", 8), ("resnet32", 16), ("resnet110", 4), ("resnet110", 8),
                    ("resnet110", 16)]:
        assert resolve_split(arch, J, "even") == resolve_split(arch, J, "infopro")


@pytest.mark.parametrize("args,match", [
    (("resnet32", 5, "infopro"), "supported J: 1, 2, 3, 4, 8, 16"),
    (("resnet32", 5, "auto"), "supported J: 1, 2, 3, 4, 8, 16"),
    (("resnet110", 8, "balanced"), "supported J: 1, 2, 3, 4"),
    (("resnet32", 3, "layerwise"), "must be 16"),
    (("resnet20", 11, "even"), "supported J: 1..10"),
])
def test_split_errors(args, match):
    with pytest.raises(UserError, match=match):
        resolve_split(*args)


# prior-art §2 [D]: ResNet-32 parameter counts with heads at InfoPro's split points
@pytest.mark.parametrize("J,aux,expected", [
    (16, "1c2f", 855_280), (16, "adapt", 993_520), (16, "2c2f", 1_243_888),
    (8, "1c2f", 647_008), (8, "adapt", 707_872), (8, "2c2f", 822_816),
    (4, "1c2f", 551_864), (4, "adapt", 577_656), (2, "1c2f", 495_076), (2, "adapt", 511_588),
    (2, "2c2f", 532_068),
])
def test_parameter_counts(J, aux, expected):
    assert cifar_resnet("resnet32", J, aux=aux).count_parameters()["total"] == expected


def test_backbone_and_infopro_counts():
    assert cifar_resnet("resnet32", 1, aux=None).count_parameters()["total"] == 466_906
    assert cifar_resnet("resnet110", 1, aux=None).count_parameters()["total"] == 1_730_714
    # InfoPro J=16 with CE heads and decoders: 0.916M (prior-art §2)
    assert round(cifar_resnet("resnet32", 16, aux="1c2f", decoders=True).count_parameters()["total"] / 1e3) == 916
