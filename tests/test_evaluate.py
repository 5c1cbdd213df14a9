"""Zero-shot evaluation against a direct computation."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from gift_fast.data.base import TaskSpec
from gift_fast.evaluate import evaluate_task, evaluate_tasks, zero_shot_classifier
from gift_fast.models import create_clip
from gift_fast.precision import Precision


class ListDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _bundle():
    torch.manual_seed(0)
    return create_clip("toy-vit-test", None)


def test_classifier_is_normalized_mean_of_normalized_template_embeddings():
    b = _bundle()
    names, templates = ["red", "circle", "seven"], ["a photo of a {}.", "a {}.", "an image of a {}."]
    W = zero_shot_classifier(b.model, b.tokenizer, names, templates, device=torch.device("cpu"), batch_size=4)
    with torch.no_grad():
        want = []
        for c in names:
            e = b.model.encode_text(b.tokenize([t.format(c) for t in templates]))
            e = e / e.norm(dim=-1, keepdim=True)
            m = e.mean(0)
            want.append(m / m.norm())
    torch.testing.assert_close(W, torch.stack(want), rtol=1e-5, atol=1e-6)


def test_accuracy_is_top1_of_100_cosine_logits_for_every_data_path():
    b = _bundle()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 3, 32, 32, generator=g)
    names = ["red", "blue", "circle", "square"]
    W = zero_shot_classifier(b.model, b.tokenizer, names, ["a photo of a {}."], device=torch.device("cpu"))
    with torch.no_grad():
        pred = (100 * F.normalize(b.model.encode_image(x), dim=-1) @ W.T).argmax(1)
    y = pred.clone()
    y[::3] = (y[::3] + 1) % 4                               # make exactly ceil(37 / 3) = 13 wrong
    want = 100.0 * (37 - 13) / 37
    for ds in (TensorDataset(x, y), ListDataset(x, y)):
        task = TaskSpec("T", names, ["a photo of a {}."], test=ds)
        acc = evaluate_task(b.model, b.tokenizer, task, device=torch.device("cpu"), batch_size=8)
        assert abs(acc - want) < 1e-9
    assert b.model.training                                  # evaluation restores the mode
    task = TaskSpec("T", names, ["a photo of a {}."], test=TensorDataset(x, y))
    assert evaluate_tasks(b.model, b.tokenizer, [task, task], device=torch.device("cpu"), progress=False) == \
        [acc, acc]


def test_empty_test_set_is_a_clear_error():
    b = _bundle()
    task = TaskSpec("Empty", ["a"], ["{}"], test=TensorDataset(torch.zeros(0, 3, 32, 32), torch.zeros(0).long()))
    with pytest.raises(ValueError, match="no test data"):
        evaluate_task(b.model, b.tokenizer, task, device=torch.device("cpu"))


def test_bf16_on_a_gpu_without_support_is_refused_as_train_refuses_it(monkeypatch):
    # `gift-fast eval --bf16` goes through these functions: the same check as `train` (gift_fast.precision)
    b = _bundle()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    task = TaskSpec("T", ["a", "b"], ["{}"], test=TensorDataset(torch.zeros(2, 3, 32, 32), torch.zeros(2).long()))
    cuda = torch.device("cuda")
    for call in (lambda: evaluate_tasks(b.model, b.tokenizer, [task], device=cuda, bf16=True, progress=False),
                 lambda: evaluate_task(b.model, b.tokenizer, task, device=cuda, bf16=True),
                 lambda: zero_shot_classifier(b.model, b.tokenizer, ["a"], ["{}"], device=cuda, bf16=True)):
        with pytest.raises(ValueError, match="--bf16 needs a GPU with bfloat16 support"):
            call()


def test_a_precision_resolved_once_gives_the_same_accuracy():
    b = _bundle()
    g = torch.Generator().manual_seed(2)
    task = TaskSpec("T", ["red", "blue"], ["a photo of a {}."],
                    test=TensorDataset(torch.randn(9, 3, 32, 32, generator=g), torch.randint(0, 2, (9,), generator=g)))
    cpu = torch.device("cpu")
    for bf16 in (False, True):
        want = evaluate_tasks(b.model, b.tokenizer, [task], device=cpu, bf16=bf16, progress=False)
        got = evaluate_tasks(b.model, b.tokenizer, [task], device=cpu, progress=False,
                             precision=Precision.resolve(cpu, bf16))
        assert got == want
