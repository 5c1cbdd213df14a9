import pytest

from gift_fast.config import MTIL_TASKS, task_lr, task_order


def test_orders_are_permutations():
    assert sorted(task_order(1)) == sorted(MTIL_TASKS) == sorted(task_order(2))
    assert task_order(1)[0] == "Aircraft" and task_order(2)[0] == "StanfordCars"


def test_lrs():
    assert task_lr("MNIST") == 5e-5 and task_lr("Aircraft") == 5e-5 and task_lr("DTD") == 1e-5


@pytest.mark.parametrize("bad", [0, 3, "x", None])
def test_unknown_order(bad):
    with pytest.raises(ValueError, match="unknown order"):
        task_order(bad)
