"""The pipeline cost model against cases worked out by hand."""
import pytest

from pgl_fast.distributed.cost_model import (activation_bytes, check_against, format_markdown, predict_global,
                                             predict_local, predict_pgl, table_rows)

INF = 1e30  # a link that costs nothing


def test_local_epoch_no_communication():
    # two stages of 2 s per batch, 10 batches: the first batch takes 4 s to cross, then one every 2 s
    r = predict_local([1, 1, 1, 1], [92] * 4, [(0, 2), (2, 4)], batch=10, n_batches=10, bandwidth=INF)
    assert r["stage_seconds"] == [2, 2]
    assert r["period"] == 2
    assert r["epoch_seconds"] == pytest.approx(22)
    assert r["speedup"] == pytest.approx(40 / 22)
    assert r["balance"] == 1
    assert r["bubble"] == pytest.approx(1 - 40 / 44)


def test_local_epoch_with_communication():
    # 92 activation bytes + 8 label bytes per sample, batch 10 at 1000 B/s: 1 s per cut
    args = dict(batch=10, n_batches=10, bandwidth=1000.0)
    over = predict_local([1, 1, 1, 1], [92] * 4, [(0, 2), (2, 4)], **args)
    assert over["cut_seconds"] == [pytest.approx(1)]
    assert over["epoch_seconds"] == pytest.approx(2 + 1 + 2 + 9 * 2)  # hidden behind compute
    assert not over["comm_bound"]
    serial = predict_local([1, 1, 1, 1], [92] * 4, [(0, 2), (2, 4)], overlap=False, **args)
    assert serial["period"] == pytest.approx(3)  # each side pays the copy
    assert serial["epoch_seconds"] == pytest.approx(5 + 9 * 3)
    slow = predict_local([1, 1, 1, 1], [92] * 4, [(0, 2), (2, 4)], batch=10, n_batches=10, bandwidth=250.0)
    assert slow["comm_bound"] and slow["period"] == pytest.approx(4)
    # latency adds per message
    lat = predict_local([1, 1, 1, 1], [92] * 4, [(0, 2), (2, 4)], latency=0.5, **args)
    assert lat["cut_seconds"] == [pytest.approx(1.5)]


def test_local_epoch_imbalance():
    r = predict_local([3, 1], [0, 0], [(0, 1), (1, 2)], batch=1, n_batches=100, bandwidth=INF)
    assert r["balance"] == pytest.approx(4 / 6)
    assert r["period"] == 3
    assert r["speedup"] == pytest.approx(400 / (4 + 99 * 3))


def test_global_step_gpipe():
    one = predict_global([1, 1], [0, 0], [(0, 1), (1, 2)], batch=8, micro_batches=1, bandwidth=INF)
    assert one["step_seconds"] == pytest.approx(2) and one["speedup"] == pytest.approx(1)  # no overlap at all
    two = predict_global([1, 1], [0, 0], [(0, 1), (1, 2)], batch=8, micro_batches=2, bandwidth=INF)
    assert two["step_seconds"] == pytest.approx(1.5)
    assert two["speedup"] == pytest.approx(2 / 1.5)
    assert two["balanced_bubble"] == pytest.approx(1 / 3)
    # 100 bytes per sample, 4 per micro-batch at 400 B/s: 1 s per crossing, forward and backward
    comm = predict_global([1, 1], [92, 92], [(0, 1), (1, 2)], batch=8, micro_batches=2, bandwidth=400.0)
    assert comm["step_seconds"] == pytest.approx(1.5 + 2)


def test_pgl_mix():
    loc = predict_local([1, 1], [0, 0], [(0, 1), (1, 2)], batch=1, n_batches=10, bandwidth=INF)  # 11 s vs 20
    glo = predict_global([1, 1], [0, 0], [(0, 1), (1, 2)], batch=1, micro_batches=1, bandwidth=INF)  # 2 vs 2
    # one local and one global epoch of 10 steps: (20 + 20) / (11 + 20)
    assert predict_pgl(loc, glo, period=1, duration=1, n_batches=10) == pytest.approx(40 / 31)


def test_activation_bytes_resnet32_J4():
    # InfoPro's cuts after units 3, 7, 11: 16x32x32, 32x16x16, 64x8x8, then the last 64x8x8
    assert activation_bytes("resnet32", 4) == [16 * 32 * 32 * 4, 32 * 16 * 16 * 4, 64 * 8 * 8 * 4, 64 * 8 * 8 * 4]
    assert activation_bytes("resnet32", 4, dtype_bytes=2)[0] == 16 * 32 * 32 * 2


def test_table_rows():
    times = {("resnet32", 4): [4.0, 3.0, 2.0, 1.0]}
    rows = table_rows(times, stages=(2, 4, 8), batch=128, n_batches=100, bandwidth=INF, latency=0.0)
    assert [r["S"] for r in rows] == [2, 4]  # S > J is skipped
    assert rows[0]["stages"] == "1/3" and rows[0]["balance"] == pytest.approx(10 / 12, abs=1e-3)
    assert rows[1]["stages"] == "1/1/1/1" and rows[1]["balance"] == pytest.approx(10 / 16, abs=1e-3)
    assert rows[0]["local_speedup"] == pytest.approx(1000 / (10 + 99 * 6), abs=0.01)
    assert "| resnet32 | 4 | 2 | 1/3 |" in format_markdown(rows)
    assert check_against(110.0, 100.0)["ratio"] == pytest.approx(1.1)
