"""Zero-shot evaluation (docs/METHOD.md, "The MTIL protocol").

For each task: the class embedding is the normalized mean of the normalized
embeddings of the class name in every template of the task; the logits of an
image are ``100 * n(f_img) @ W^T``; the score is top-1 accuracy in percent.
Batched, under ``no_grad`` (and bf16 autocast when asked). With several processes
(``dist``, gift_fast.distributed) each scores a contiguous slice of every test set and
the correct counts are summed: the same accuracy as one process, N times faster.

Precision: every function takes ``bf16=`` (checked as ``train`` checks it: a GPU without
bfloat16 support refuses it, gift_fast.precision) or a ``precision=`` the caller resolved once.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gift_fast.data.base import TaskSpec
from gift_fast.distributed import SINGLE, DistContext, all_reduce_sum
from gift_fast.precision import Precision
from gift_fast.text import encode_text, trim_tokens


def _resolve_precision(device: torch.device, bf16: bool, precision: Optional[Precision]) -> Precision:
    """The caller's ``precision``, or ``bf16`` on ``device`` checked (``--bf16`` on a GPU without bfloat16
    support is refused here, for ``gift-fast eval`` as for ``train``)."""
    if precision is None:
        return Precision.resolve(device, bf16)
    if bf16 and not precision.bf16:
        raise ValueError("bf16=True but the precision given is float32: pass one of them")
    return precision


@torch.no_grad()
def encode_texts(model, tokenizer: Callable, texts: Sequence[str], *, device: torch.device, bf16: bool = False,
                 batch_size: int = 512, precision: Optional[Precision] = None) -> torch.Tensor:
    """Float32 text embeddings (not normalized) of ``texts``, in batches (each cut after its last
    end-of-text token: gift_fast.text, the same embeddings)."""
    precision = _resolve_precision(device, bf16, precision)
    out = []
    for a in range(0, len(texts), batch_size):
        tokens = trim_tokens(model, tokenizer(list(texts[a:a + batch_size]))).to(device)
        with precision.autocast():
            out.append(encode_text(model, tokens).float())
    return torch.cat(out)


@torch.no_grad()
def zero_shot_classifier(model, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str], *,
                         device: torch.device, bf16: bool = False, batch_size: int = 512,
                         precision: Optional[Precision] = None) -> torch.Tensor:
    """``W`` [C, D]: per class, the normalized mean of the normalized template embeddings."""
    if not classnames:
        raise ValueError("a task needs at least one class name")
    if not templates:
        raise ValueError("a task needs at least one template (a format string with '{}')")
    precision = _resolve_precision(device, bf16, precision)
    texts = [t.format(c) for c in classnames for t in templates]
    emb = F.normalize(encode_texts(model, tokenizer, texts, device=device, batch_size=batch_size,
                                   precision=precision), dim=-1)
    emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def iter_eval_batches(dataset, batch_size: int, device: torch.device, num_workers: int = 0,
                      start: int = 0, stop: Optional[int] = None):
    """(float images, labels) batches of items ``[start, stop)`` of a test set on ``device``, in order."""
    stop = len(dataset) if stop is None else stop
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:                                       # TensorDataset (toy world)
        images, labels = tensors
        for a in range(start, stop, batch_size):
            b = min(stop, a + batch_size)
            yield images[a:b].to(device), labels[a:b].to(device)
        return
    if getattr(dataset, "layout", "center-crop") != "center-crop":
        raise ValueError(f"cannot evaluate on a {dataset.layout!r} cache (randomly cropped training images): "
                         f"evaluation needs the deterministic resize + center crop (layout 'center-crop')")
    if hasattr(dataset, "get_batch") and hasattr(dataset, "normalize"):   # CachedImageDataset
        for a in range(start, stop, batch_size):
            x, y = dataset.get_batch(range(a, min(stop, a + batch_size)))
            yield dataset.normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        return
    if (start, stop) != (0, len(dataset)):
        dataset = torch.utils.data.Subset(dataset, range(start, stop))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    for x, y in loader:
        yield x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)


@torch.no_grad()
def evaluate_task(model, tokenizer: Callable, task: TaskSpec, *, device: torch.device, bf16: bool = False,
                  batch_size: int = 256, num_workers: int = 0, progress: bool = False,
                  classifier: Optional[torch.Tensor] = None, dist: DistContext = SINGLE,
                  precision: Optional[Precision] = None) -> float:
    """Top-1 zero-shot accuracy (percent) of ``model`` on ``task.test`` (sharded over ``dist``)."""
    if task.test is None or len(task.test) == 0:
        raise ValueError(f"task {task.name!r} has no test data to evaluate on")
    precision = _resolve_precision(device, bf16, precision)
    was_training = model.training
    model.eval()
    try:
        W = classifier if classifier is not None else zero_shot_classifier(
            model, tokenizer, task.classnames, task.templates, device=device, precision=precision)
        # counts[0] correct, counts[1] scored: summed over the processes at the end
        counts = torch.zeros(2, dtype=torch.int64, device=device)
        start, stop = dist.span(len(task.test))
        n_batches = -(-(stop - start) // batch_size)
        for x, y in tqdm(iter_eval_batches(task.test, batch_size, device, num_workers, start, stop),
                         total=n_batches, desc=f"eval {task.name}", disable=not progress, leave=False):
            with precision.autocast():
                img = model.encode_image(x)
            logits = 100.0 * F.normalize(img.float(), dim=-1) @ W.T
            counts[0] += (logits.argmax(dim=-1) == y).sum()
            counts[1] += y.shape[0]
        counts = all_reduce_sum(counts, dist)
    finally:
        model.train(was_training)
    correct, total = (int(v) for v in counts.tolist())
    return 100.0 * correct / total


def evaluate_tasks(model, tokenizer: Callable, tasks: Sequence[TaskSpec], *, device: torch.device,
                   bf16: bool = False, batch_size: int = 256, num_workers: int = 0,
                   progress: bool = True, dist: DistContext = SINGLE,
                   precision: Optional[Precision] = None) -> List[float]:
    """Accuracy (percent) on every task, in order: one row of the accuracy matrix."""
    precision = _resolve_precision(device, bf16, precision)
    return [evaluate_task(model, tokenizer, t, device=device, batch_size=batch_size,
                          num_workers=num_workers, progress=False, dist=dist, precision=precision)
            for t in tqdm(tasks, desc="evaluating", disable=not progress, leave=False)]


__all__ = ["zero_shot_classifier", "evaluate_task", "evaluate_tasks", "encode_texts", "iter_eval_batches"]
