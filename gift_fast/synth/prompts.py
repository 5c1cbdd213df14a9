"""The prompt pool, the prompts sampled from it, and one seed per image.

As in the authors' ``txt2img.py`` (docs/PROTOCOL_PROMPTS.md): the pool of task t holds
the 1,000 ImageNet class names and the class names of every task learned before t,
each entry templated with *its own data set's* first template (ImageNet names with
``"a photo of a {}."``, Aircraft names with ``"a photo of a {}, a type of aircraft."``,
...); the prompts of task t are drawn uniformly *with replacement* from that pool.
``sequence_prompts`` is the one function that makes the prompts of a sequence; the
``synth`` engine and training's on-the-fly synthesis both call it.

Two seed schemes. ``"hash"`` (the default) is described below. ``"authors"``
reproduces ``txt2img.py``: the draws come from Python's ``random.Random(seed)``, task
after task (``random.choice`` over the pool, ``images_per_task`` draws each; this
reproduces the authors' released CSVs row by row), and image j of task t (0-based)
gets the seed ``j + 100000 * (t - 1) + 10**7 * seed`` (their ``j + 100000 *
(k - 1) + 10**7 * seed`` with k the position of the data set before the task in
``[ImageNet, task 1, ...]``, i.e. k = t).

The ``"hash"`` scheme:

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

import random
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from gift_fast.data.mtil_metadata import imagenet_classnames   # a data module: no torch import

DEFAULT_TEMPLATE = "a photo of a {}."
# How the authors template ImageNet names in the pool (their ``ImageNet.template``; not the
# first of the 80 ImageNet evaluation templates).
IMAGENET_SYNTHETIC_TEMPLATE = "a photo of a {}."
SEED_SCHEMES = ("hash", "authors")
# the authors' seed: j + AUTHORS_TASK_STRIDE * (t - 1) + AUTHORS_RUN_STRIDE * seed
AUTHORS_TASK_STRIDE = 100_000
AUTHORS_RUN_STRIDE = 10_000_000

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


def imagenet_pool_source() -> PoolSource:
    """ImageNet's entry of the pool: its 1,000 names with the authors' ``"a photo of a {}."``."""
    return PoolSource("ImageNet", tuple(imagenet_classnames()), IMAGENET_SYNTHETIC_TEMPLATE)


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
    _check_template(template)
    idx = prompt_indices(len(pool), n, seed=seed, task_index=task_index)
    return [template.format(pool[k]) for k in idx]


def _check_template(template: str, where: str = "template") -> str:
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"{where} must contain exactly one '{{}}' for the class name, got {template!r}")
    return template


@dataclass(frozen=True)
class PoolSource:
    """One data set's contribution to the prompt pool: its class names and its first template."""
    name: str
    classnames: Tuple[str, ...]
    template: str = DEFAULT_TEMPLATE

    def prompts(self) -> List[str]:
        return [self.template.format(c) for c in self.classnames]


def pool_source(name: str, classnames: Sequence[str], template: Optional[str] = None) -> PoolSource:
    """A checked ``PoolSource`` (``template`` None: ``DEFAULT_TEMPLATE``)."""
    names = _check_names(f"classnames of {name!r}", classnames)
    return PoolSource(str(name), tuple(names), _check_template(template or DEFAULT_TEMPLATE, f"template of {name!r}"))


def task_pools(base: PoolSource, tasks: Sequence[PoolSource], exclude: Iterable[str] = ()) -> List[List[str]]:
    """The prompt pool of every task: task t's is ``base`` then ``tasks[:t]``, each entry templated with its
    source's template, leaving out the sources named in ``exclude`` (the paper's Fig. 9 ablation).

    A multiset, as the authors' list: a prompt that two sources produce is listed (and drawn) twice.
    """
    exclude = set(exclude)
    known = {base.name} | {s.name for s in tasks}
    unknown = sorted(exclude - known)
    if unknown:
        raise ValueError(f"pool exclude names unknown data set(s) {', '.join(unknown)}; the pool's sources are: "
                         f"{', '.join([base.name] + [s.name for s in tasks])}")
    pools, pool = [], ([] if base.name in exclude else base.prompts())
    for t, src in enumerate(tasks):
        if not pool:
            raise ValueError(f"the prompt pool of task {t} ({src.name}) is empty: its sources "
                             f"{', '.join([base.name] + [s.name for s in tasks[:t]])} are all excluded")
        pools.append(list(pool))
        if src.name not in exclude:
            pool.extend(src.prompts())
    return pools


def pool_task_names(tasks: Sequence[PoolSource], t: int, exclude: Iterable[str] = ()) -> List[str]:
    """The names of the learned tasks whose classes are in task ``t``'s pool (what manifests record)."""
    exclude = set(exclude)
    return [s.name for s in tasks[:t] if s.name not in exclude]


def sequence_prompts(base: PoolSource, tasks: Sequence[PoolSource], images_per_task: int, *, seed: int,
                     scheme: str = "hash", exclude: Iterable[str] = ()) -> List[List[str]]:
    """The prompts of every task of a sequence (one list per task): THE rule of this project.

    ``scheme="hash"``: prompt i of task t is ``pool_t[counter_hash(seed, t, i) % len(pool_t)]``
    (``prompt_indices``): independent of ``images_per_task``, so smaller sets are subsets of larger.
    ``scheme="authors"``: ``random.Random(seed)``, then for each task in order ``images_per_task``
    draws of ``rng.choice(pool_t)``, as ``txt2img.py`` (its released CSVs are reproduced exactly).
    """
    images_per_task = _check_int("images_per_task", images_per_task, 0)
    seed = _check_int("seed", seed, 0)
    if scheme not in SEED_SCHEMES:
        raise ValueError(f"unknown seed scheme {scheme!r}; use one of {', '.join(SEED_SCHEMES)}")
    pools = task_pools(base, tasks, exclude)
    if scheme == "authors":
        rng = random.Random(seed)
        return [[rng.choice(pool) for _ in range(images_per_task)] for pool in pools]
    return [[pool[k] for k in prompt_indices(len(pool), images_per_task, seed=seed, task_index=t)]
            for t, pool in enumerate(pools)]


def authors_image_seed(seed: int, task_index: int, index: int, attempt: int = 0) -> int:
    """The authors' seed of image ``index`` of task ``task_index`` (0-based): ``index + 100000 *
    (task_index - 1) + 10**7 * seed``; retry k adds ``k * RETRY_SEED_STRIDE`` (the authors do not
    regenerate black images: use ``max_retries=0`` to match them). May be negative (seed 0, task 0),
    which ``torch.Generator.manual_seed`` accepts."""
    seed = _check_int("seed", seed, 0)
    task_index = _check_int("task_index", task_index, 0)
    index = _check_int("index", index, 0)
    attempt = _check_int("attempt", attempt, 0)
    return index + AUTHORS_TASK_STRIDE * (task_index - 1) + AUTHORS_RUN_STRIDE * seed + attempt * RETRY_SEED_STRIDE


def seed_for(scheme: str, seed: int, task_index: int, index: int, attempt: int = 0) -> int:
    """The seed of an image under ``scheme`` (``"hash"``: ``image_seed``; ``"authors"``: ``authors_image_seed``)."""
    if scheme == "authors":
        return authors_image_seed(seed, task_index, index, attempt)
    if scheme != "hash":
        raise ValueError(f"unknown seed scheme {scheme!r}; use one of {', '.join(SEED_SCHEMES)}")
    return image_seed(seed, task_index, index, attempt)


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
