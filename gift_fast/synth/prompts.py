"""The class pool, the prompts sampled from it, and one seed per image.

METHOD.md, "Synthetic data": the pool is the 1,000 ImageNet class names plus the
class names of every task learned so far; for task t the prompts are drawn
uniformly *with replacement* from the pool as it stands before task t and
templated as ``"a photo of a {}."``; each image has its own seed derived from
(run seed, task index, image index).

Both the prompt draws and the seeds come from a counter-based generator
(SplitMix64 of the tuple): draw ``i`` depends only on (seed, task_index, i), never
on how many draws were made, on the batch size or on the number of processes.
Hence any image can be regenerated alone, and the first n prompts of a task are
the same whether the task has n or 10 n images (smaller synthetic sets are
subsets of larger ones, as in the paper's Fig. 3).

``task_index`` is the 0-based position of the task in its sequence (task 1 of
the paper is index 0).
"""
from __future__ import annotations

from typing import Iterable, List, Sequence

DEFAULT_TEMPLATE = "a photo of a {}."

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1
# Distinct streams so a prompt draw and an image seed of the same index are unrelated.
_STREAM_PROMPT = 0x5052_4F4D_5054  # "PROMPT"
_STREAM_IMAGE = 0x494D_4147_45     # "IMAGE"
# Retry k of an image uses image_seed + k * RETRY_SEED_STRIDE (mod 2**63): a large
# prime, so retries of neighbouring images never collide with each other's seeds.
RETRY_SEED_STRIDE = 1_000_000_007


def _splitmix64(x: int) -> int:
    """SplitMix64 finalizer: a bijective, well-mixed 64-bit hash (Steele et al. 2014)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _counter_hash(*parts: int) -> int:
    """Hash a tuple of integers (any sign, any size) into 64 bits, order-sensitive."""
    h = 0x243F6A8885A308D3  # digits of pi: an arbitrary non-zero start
    for p in parts:
        p = int(p)
        # fold integers wider than 64 bits (and negative ones) in 64-bit limbs
        limbs = [p & _MASK64]
        rest = p >> 64
        while rest not in (0, -1):
            limbs.append(rest & _MASK64)
            rest >>= 64
        limbs.append(1 if p < 0 else 0)
        for limb in limbs:
            h = _splitmix64(h ^ limb)
    return h


def _check_int(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np  # numpy integers are fine
            if isinstance(value, np.integer):
                value = int(value)
            else:
                raise TypeError
        except (ImportError, TypeError):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def imagenet_classnames() -> List[str]:
    """The 1,000 ImageNet class names as CLIP cleaned them (open_clip's zero-shot metadata)."""
    try:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    except ImportError as e:  # pragma: no cover - open_clip is a dependency
        raise ImportError("the ImageNet class names come from open_clip: pip install open_clip_torch") from e
    names = list(IMAGENET_CLASSNAMES)
    if len(names) != 1000:  # pragma: no cover - guards a changed upstream list
        raise RuntimeError(f"open_clip's IMAGENET_CLASSNAMES has {len(names)} names, expected 1000")
    return names


def _check_names(where: str, names: Iterable[str]) -> List[str]:
    out = list(names) if not isinstance(names, str) else None
    if out is None:
        raise TypeError(f"{where} must be a list of class names, got a single string {names!r}")
    for k, n in enumerate(out):
        if not isinstance(n, str) or not n.strip():
            raise ValueError(f"{where}[{k}] must be a non-empty string, got {n!r}")
    return out


def build_class_pool(base_classnames: Sequence[str], learned: Sequence[Sequence[str]]) -> List[str]:
    """The pool for the next task: the base names followed by each learned task's names, in order.

    The pool is a multiset, as in the reference: a name that occurs in the base set and
    in a task (or in two tasks) is listed twice and is drawn twice as often.
    ``learned`` holds one list of class names per task learned so far (empty for task 1).
    """
    pool = _check_names("base_classnames", base_classnames)
    if isinstance(learned, str):
        raise TypeError("learned must be a list of per-task class-name lists, got a string")
    for t, names in enumerate(learned):
        pool.extend(_check_names(f"learned[{t}]", names))
    if not pool:
        raise ValueError("the class pool is empty: give base class names (ImageNet by default) or learned tasks")
    return pool


def prompt_indices(pool_size: int, n: int, *, seed: int, task_index: int) -> List[int]:
    """Indices into a pool of ``pool_size`` names for images ``0..n-1`` (uniform, with replacement)."""
    pool_size = _check_int("pool_size", pool_size, 1)
    n = _check_int("n", n, 0)
    seed = _check_int("seed", seed, 0)
    task_index = _check_int("task_index", task_index, 0)
    # modulo bias is pool_size / 2**64 (< 1e-15 for any real pool): uniform for all purposes
    return [_counter_hash(_STREAM_PROMPT, seed, task_index, i) % pool_size for i in range(n)]


def sample_prompts(pool: Sequence[str], n: int, *, seed: int, task_index: int,
                   template: str = DEFAULT_TEMPLATE) -> List[str]:
    """``n`` prompts for task ``task_index``: class names drawn from ``pool`` with replacement, templated.

    Prompt ``i`` depends only on (pool, seed, task_index, i): the same for any ``n > i``.
    """
    pool = _check_names("pool", pool)
    if not pool:
        raise ValueError("pool is empty: nothing to sample prompts from")
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"template must contain exactly one '{{}}' for the class name, got {template!r}")
    idx = prompt_indices(len(pool), n, seed=seed, task_index=task_index)
    return [template.format(pool[k]) for k in idx]


def image_seed(seed: int, task_index: int, index: int, attempt: int = 0) -> int:
    """The seed of image ``index`` of task ``task_index``: a 63-bit int for ``torch.Generator.manual_seed``.

    ``attempt`` > 0 is the k-th regeneration of an image the safety checker blacked out:
    ``(image_seed(seed, task_index, index) + attempt * RETRY_SEED_STRIDE) mod 2**63``.
    """
    seed = _check_int("seed", seed, 0)
    task_index = _check_int("task_index", task_index, 0)
    index = _check_int("index", index, 0)
    attempt = _check_int("attempt", attempt, 0)
    base = _counter_hash(_STREAM_IMAGE, seed, task_index, index) & _MASK63
    return (base + attempt * RETRY_SEED_STRIDE) & _MASK63


def shard_indices(n: int, rank: int = 0, world_size: int = 1) -> List[int]:
    """The image indices process ``rank`` of ``world_size`` owns: ``rank, rank + W, rank + 2W, ...``.

    Disjoint across ranks and together exactly ``range(n)``; loads differ by at most one image.
    """
    n = _check_int("n", n, 0)
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank {rank} is out of range for world_size {world_size}")
    return list(range(rank, n, world_size))
