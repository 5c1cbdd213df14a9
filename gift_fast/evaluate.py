"""Zero-shot evaluation (METHOD.md, "Protocol").

For each task: the class embedding is the normalized mean of the normalized
embeddings of the class name in every template of the task; the logits of an
image are ``100 * n(f_img) @ W^T``; the score is top-1 accuracy in percent.
Batched, under ``no_grad`` (and bf16 autocast when asked).
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from gift_fast.data.base import TaskSpec


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@torch.no_grad()
def encode_texts(model, tokenizer: Callable, texts: Sequence[str], *, device: torch.device, bf16: bool = False,
                 batch_size: int = 512) -> torch.Tensor:
    """Float32 text embeddings (not normalized) of ``texts``, in batches."""
    out = []
    for a in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[a:a + batch_size])).to(device)
        with autocast(device, bf16):
            out.append(model.encode_text(tokens).float())
    return torch.cat(out)


@torch.no_grad()
def zero_shot_classifier(model, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str], *,
                         device: torch.device, bf16: bool = False, batch_size: int = 512) -> torch.Tensor:
    """``W`` [C, D]: per class, the normalized mean of the normalized template embeddings."""
    if not classnames:
        raise ValueError("a task needs at least one class name")
    if not templates:
        raise ValueError("a task needs at least one template (a format string with '{}')")
    texts = [t.format(c) for c in classnames for t in templates]
    emb = F.normalize(encode_texts(model, tokenizer, texts, device=device, bf16=bf16, batch_size=batch_size), dim=-1)
    emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def iter_eval_batches(dataset, batch_size: int, device: torch.device, num_workers: int = 0):
    """(float images, labels) batches of a test set on ``device``, in order."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:                                       # TensorDataset (toy world)
        images, labels = tensors
        for a in range(0, len(images), batch_size):
            yield images[a:a + batch_size].to(device), labels[a:a + batch_size].to(device)
        return
    if hasattr(dataset, "get_batch") and hasattr(dataset, "normalize"):   # CachedImageDataset
        n = len(dataset)
        for a in range(0, n, batch_size):
            x, y = dataset.get_batch(range(a, min(n, a + batch_size)))
            yield dataset.normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    for x, y in loader:
        yield x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)


@torch.no_grad()
def evaluate_task(model, tokenizer: Callable, task: TaskSpec, *, device: torch.device, bf16: bool = False,
                  batch_size: int = 256, num_workers: int = 0, progress: bool = False,
                  classifier: Optional[torch.Tensor] = None) -> float:
    """Top-1 zero-shot accuracy (percent) of ``model`` on ``task.test``."""
    from tqdm.auto import tqdm

    if task.test is None or len(task.test) == 0:
        raise ValueError(f"task {task.name!r} has no test data to evaluate on")
    was_training = model.training
    model.eval()
    try:
        W = classifier if classifier is not None else zero_shot_classifier(
            model, tokenizer, task.classnames, task.templates, device=device, bf16=bf16)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        total = 0
        n_batches = -(-len(task.test) // batch_size)
        for x, y in tqdm(iter_eval_batches(task.test, batch_size, device, num_workers), total=n_batches,
                         desc=f"eval {task.name}", disable=not progress, leave=False):
            with autocast(device, bf16):
                img = model.encode_image(x)
            logits = 100.0 * F.normalize(img.float(), dim=-1) @ W.T
            correct += (logits.argmax(dim=-1) == y).sum()
            total += int(y.shape[0])
    finally:
        model.train(was_training)
    return 100.0 * float(correct) / total


def evaluate_tasks(model, tokenizer: Callable, tasks: Sequence[TaskSpec], *, device: torch.device,
                   bf16: bool = False, batch_size: int = 256, num_workers: int = 0,
                   progress: bool = True) -> List[float]:
    """Accuracy (percent) on every task, in order: one row of the accuracy matrix."""
    from tqdm.auto import tqdm

    return [evaluate_task(model, tokenizer, t, device=device, bf16=bf16, batch_size=batch_size,
                          num_workers=num_workers, progress=False)
            for t in tqdm(tasks, desc="evaluating", disable=not progress, leave=False)]


__all__ = ["zero_shot_classifier", "evaluate_task", "evaluate_tasks", "encode_texts", "iter_eval_batches"]
