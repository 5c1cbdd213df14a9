
import numpy as np
import pytest

from gift_fast.metrics import continual_metrics


def test_hand_computed_3x3():
    acc = [[80, 50, 40],
           [70, 90, 30],
           [60, 85, 95]]
    m = continual_metrics(acc)
    # transfer: col 1 -> mean(50) = 50, col 2 -> mean(40, 30) = 35; mean = 42.5
    assert m["transfer"] == pytest.approx(42.5)
    assert m["avg"] == pytest.approx(sum(map(sum, acc)) / 9)
    assert m["last"] == pytest.approx((60 + 85 + 95) / 3)
    assert m["per_task"][0] == {"transfer": None, "avg": pytest.approx(70.0), "last": 60.0}
    assert m["per_task"][2]["transfer"] == pytest.approx(35.0)
    assert m["per_task"][1]["avg"] == pytest.approx(75.0)


def test_single_task():
    m = continual_metrics([[42.0]])
    assert m["transfer"] is None and m["avg"] == 42.0 and m["last"] == 42.0


def test_upper_triangle_only_feeds_transfer():
    a = np.full((4, 4), 10.0)
    a[np.tril_indices(4)] = 99.0  # learned tasks do not change transfer
    assert continual_metrics(a)["transfer"] == pytest.approx(10.0)


@pytest.mark.parametrize("bad", [[[1, 2, 3]], [], [[1, 2], [3, float("nan")]]])
def test_bad_matrix(bad):
    with pytest.raises(ValueError):
        continual_metrics(bad)
