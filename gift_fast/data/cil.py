"""Class-incremental benchmarks: CIFAR100 in 10 / 20 / 50 steps, TinyImageNet in 5 / 10 / 20 steps.

The protocol (GIFT's supplementary B follows DyTox [Douillard et al., CVPR 2022], as implemented
for CLIP by ZSCL's ``cil/`` code, which GIFT's reference builds on):

* **CIFAR100, N steps** (N in 10, 20, 50): the 100 classes, in a class order, are cut into N
  consecutive groups of 100 / N classes; step t trains on the train images of group t.
* **TinyImageNet, N steps** (N in 5, 10, 20): the 200 classes, in a class order; the first 100
  are learned in one base step, the other 100 are cut into N groups of 100 / N classes (DyTox's
  "100 classes first" setting; ZSCL's ``initial_increment: 100, increment: 100 / N``). So there
  are N + 1 training steps, and N counts the incremental ones, as the paper's Tab. 8 headers do.
* **No task identity at test time.** After step t the model is evaluated on the test images of
  every class seen so far (steps 0..t) with one classifier over all of those classes, labels
  being the classes' positions in the class order. The accuracy is over images (ZSCL's
  continuum ``Logger.accuracy``); CIFAR100 and TinyImageNet test sets are class-balanced, so it
  is also the mean per-class accuracy.
* **Metrics** (``gift_fast.metrics.cil_metrics``): "Avg" = the mean of these accuracies over all
  steps (the base step included), "Last" = the accuracy after the last step.
* **Class order:** ``"zscl"`` (the command line's default): ZSCL's orders (its
  ``cil/class_orders/*.yaml``; CIFAR100's is iCaRL's); ``"seeded"``: a permutation of the data
  set's label order from ``numpy.random.default_rng(seed)`` (the default before ZSCL's orders, seed
  1993); ``"icarl"`` (CIFAR100 only): the fixed order of iCaRL's original implementation, reused by
  much of the CIL literature (e.g. PODNet); or an explicit list (``--class-order FILE``, ZSCL's YAML
  format, ``read_class_order_file``). Whatever is used is written to the run folder
  (``cil-split.json``, with its source) and checked on resume.
* **Prompts:** one template, ``"a bad photo of a {}."`` (ZSCL's / Continual-CLIP's CIL template,
  with which the paper's "CLIP Zero-shot" rows were measured), unless ``templates`` is given.
* **Training loss per step:** the trainer's CE is over the current step's classes only (the
  TaskSpec of step t lists those classes, labels 0..k-1), as ZSCL's CIL code does; evaluation
  uses every class seen so far (the cumulative ``eval_tasks``).
* **Label smoothing / weight decay:** 0.2 / 0 for CIFAR100, 0 / 0.1 for TinyImageNet (the paper, Suppl. A).
* **Synthetic base class set:** 100 ImageNet class names that do not overlap the downstream
  classes (the paper, Suppl. A), chosen by ``base_classnames`` (rule in its docstring).

TinyImageNet layout (the unpacked ``tiny-imagenet-200.zip``; ``--data-root`` is its parent or
the folder itself)::

    DIR/tiny-imagenet-200/wnids.txt                      200 WordNet ids, one a line
    DIR/tiny-imagenet-200/words.txt                      "<wnid>\\t<name>, <synonym>, ..." a line
    DIR/tiny-imagenet-200/train/<wnid>/images/*.JPEG     500 images a class
    DIR/tiny-imagenet-200/val/images/val_<k>.JPEG        10,000 images (50 a class): the test set
    DIR/tiny-imagenet-200/val/val_annotations.txt        "<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>" a line

Labels are the positions of the sorted wnids (ImageFolder's / continuum's convention). Class
names: CLIP's cleaned ImageNet name of the wnid (all 200 TinyImageNet classes are ImageNet-1k
classes; ``imagenet_wnids()``, from timm, gives ImageNet's label order), else the first name in words.txt.
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from torch.utils.data import Dataset

from gift_fast.data.base import TaskSpec
from gift_fast.data.cache import (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, CachedImageDataset, clip_eval_transform,
                                  files_fingerprint, labels_fingerprint)
from gift_fast.data.mtil import TransformedDataset, build_task, imagenet_classnames
from gift_fast.files import atomic_write_text
from gift_fast.paper import CIL_RESULTS, CIL_TABLE_NAMES

CIL_TEMPLATE = "a bad photo of a {}."
# How a step's classes enter the synthetic prompt pool (the TaskSpec's "pool_template"): the CIL runs keep
# "a photo of a {}." rather than the classifier's CIL_TEMPLATE (the authors' pool rule is MTIL's).
CIL_POOL_TEMPLATE = "a photo of a {}."
DEFAULT_CLASS_ORDER_SEED = 1993
DEFAULT_BASE_SEED = 0
DEFAULT_CIL_LR = 1e-5
SPLIT_RECORD_NAME = "cil-split.json"


@dataclass(frozen=True)
class CILProtocol:
    """One class-incremental benchmark: data set, how its classes are cut, and its optimizer settings."""
    name: str
    dataset: str                        # "CIFAR100" | "TinyImageNet"
    num_classes: int
    initial_classes: Optional[int]      # classes of the base step (None: every step is equal)
    paper_steps: tuple                  # the step counts of the paper's table
    label_smoothing: float
    weight_decay: float

    @property
    def incremental_classes(self) -> int:
        return self.num_classes - (self.initial_classes or 0)


PROTOCOLS: Dict[str, CILProtocol] = {
    "cifar100-cil": CILProtocol("cifar100-cil", "CIFAR100", 100, None, (10, 20, 50),
                                label_smoothing=0.2, weight_decay=0.0),
    "tinyimagenet-cil": CILProtocol("tinyimagenet-cil", "TinyImageNet", 200, 100, (5, 10, 20),
                                    label_smoothing=0.0, weight_decay=0.1),
}

# The fixed CIFAR100 class order of iCaRL's original implementation (Rebuffi et al., CVPR 2017),
# reused by much of the class-incremental literature (PODNet, and others).
ICARL_CIFAR100_ORDER: tuple = (
    87, 0, 52, 58, 44, 91, 68, 97, 51, 15, 94, 92, 10, 72, 49, 78, 61, 14, 8, 86, 84, 96, 18,
    24, 32, 45, 88, 11, 4, 67, 69, 66, 77, 47, 79, 93, 29, 50, 57, 83, 17, 81, 41, 12, 37, 59,
    25, 20, 80, 73, 1, 28, 6, 46, 62, 82, 53, 9, 31, 75, 38, 63, 33, 74, 27, 22, 36, 3, 16, 21,
    60, 19, 70, 90, 89, 43, 5, 42, 65, 76, 40, 30, 23, 85, 2, 95, 56, 48, 71, 64, 98, 13, 99, 7,
    34, 55, 54, 26, 35, 39,
)

# ZSCL's class orders (Thunderbeee/ZSCL at b96e714, cil/class_orders/cifar100.yaml and tinyimagenet.yaml): the
# defaults of the class-incremental benchmarks, as ZSCL's CIL code (which GIFT's builds on) runs them.
# CIFAR100's is iCaRL's order above; TinyImageNet's labels are the positions of the sorted wnids, as here.
ZSCL_TINYIMAGENET_ORDER: tuple = (
    131, 181, 22, 172, 144, 92, 97, 187, 58, 93, 6, 70, 106, 68, 153, 168, 179, 199, 29, 46, 9, 142, 134,
    88, 193, 110, 26, 32, 117, 112, 17, 39, 166, 13, 94, 138, 109, 147, 51, 101, 59, 188, 116, 5, 170, 99,
    100, 167, 180, 146, 65, 1, 104, 43, 38, 184, 123, 171, 137, 162, 71, 44, 95, 174, 12, 7, 54, 152, 21,
    47, 28, 176, 34, 2, 132, 118, 42, 189, 150, 14, 165, 41, 192, 45, 82, 128, 63, 57, 197, 160, 53, 75,
    108, 135, 121, 159, 183, 67, 169, 50, 87, 69, 89, 196, 115, 19, 148, 96, 86, 11, 8, 60, 33, 173, 78, 4,
    119, 105, 182, 127, 177, 30, 186, 40, 49, 178, 76, 157, 161, 73, 164, 151, 31, 74, 191, 27, 125, 198,
    81, 20, 155, 114, 139, 36, 61, 56, 145, 48, 16, 83, 62, 85, 126, 0, 102, 23, 3, 140, 15, 195, 133, 113,
    190, 141, 52, 163, 156, 80, 111, 90, 175, 143, 120, 84, 18, 25, 79, 37, 154, 136, 64, 158, 24, 185, 72,
    35, 129, 55, 149, 91, 122, 77, 103, 124, 130, 66, 10, 107, 194, 98,
)
ZSCL_CLASS_ORDERS: Dict[str, tuple] = {"CIFAR100": ICARL_CIFAR100_ORDER, "TinyImageNet": ZSCL_TINYIMAGENET_ORDER}
ZSCL_ORDER_FILES = {"CIFAR100": "cil/class_orders/cifar100.yaml", "TinyImageNet": "cil/class_orders/tinyimagenet.yaml"}


def read_class_order_file(path: str) -> List[int]:
    """A class order from a file: ZSCL's YAML (``class_order: [87, 0, 52, ...]``), or JSON (a list, or an
    object with ``class_order``). Clear errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--class-order {path}: no such file (a YAML or JSON file with class_order: [...])")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:   # yaml.YAMLError / json.JSONDecodeError: say which file
        raise ValueError(f"--class-order {path}: cannot parse it ({type(e).__name__}: {e})") from None
    if isinstance(data, dict):
        data = data.get("class_order")
    if not isinstance(data, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in data):
        raise ValueError(f"--class-order {path}: expected class_order: a list of integer labels (ZSCL's format)")
    return [int(c) for c in data]


# The paper's Tab. 7 (CIFAR100) and Tab. 8 (TinyImageNet): {steps: {method: (Avg, Last)}}, and the tables'
# names. The numbers live in gift_fast.paper; these are the same objects under this module's names.
PAPER_RESULTS = CIL_RESULTS
PAPER_TABLE_NAMES = CIL_TABLE_NAMES


def protocol(benchmark: str) -> CILProtocol:
    """The protocol of ``benchmark`` ("cifar100-cil" | "tinyimagenet-cil"); a clear error otherwise."""
    try:
        return PROTOCOLS[benchmark]
    except KeyError:
        raise ValueError(f"unknown class-incremental benchmark {benchmark!r}; known: "
                         f"{', '.join(PROTOCOLS)}") from None


def paper_results(benchmark: str, steps: int) -> Dict[str, tuple]:
    """The paper's ``{method: (Avg, Last)}`` for ``benchmark`` at ``steps`` (empty when the table has no column)."""
    return dict(PAPER_RESULTS[protocol(benchmark).name].get(int(steps), {}))


# Old names ("seed" meant the paper; it now means only a random seed): kept so older code keeps working.
SEED_RESULTS = PAPER_RESULTS
SEED_TABLE_NAMES = PAPER_TABLE_NAMES
seed_results = paper_results


# --------------------------------------------------------------------------- class order and steps
def class_order(num_classes: int, order: Union[str, Sequence[int]] = "seeded",
                seed: int = DEFAULT_CLASS_ORDER_SEED) -> List[int]:
    """The order in which the data set's labels ``0..num_classes-1`` are learned.

    ``"seeded"``: ``numpy.random.default_rng(seed).permutation(num_classes)``; ``"icarl"``: iCaRL's
    fixed CIFAR100 order (needs 100 classes); ``"natural"``: 0..C-1; a sequence: used as given
    (it must be a permutation of 0..C-1)."""
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if isinstance(order, str):
        if order == "seeded":
            out = [int(c) for c in np.random.default_rng(int(seed)).permutation(num_classes)]
        elif order == "icarl":
            if num_classes != len(ICARL_CIFAR100_ORDER):
                raise ValueError(f"the 'icarl' order is CIFAR100's (100 classes), not one of {num_classes} classes")
            out = list(ICARL_CIFAR100_ORDER)
        elif order == "natural":
            out = list(range(num_classes))
        elif order == "zscl":
            found = [o for o in ZSCL_CLASS_ORDERS.values() if len(o) == num_classes]
            if not found:
                raise ValueError(f"ZSCL has class orders for CIFAR100 (100 classes) and TinyImageNet (200), not for "
                                 f"{num_classes} classes")
            out = list(found[0])
        else:
            raise ValueError(f"unknown class order {order!r}: use 'zscl', 'seeded', 'icarl', 'natural' or a list of "
                             f"labels")
    else:
        out = [int(c) for c in order]
    if sorted(out) != list(range(num_classes)):
        raise ValueError(f"a class order must list each label 0..{num_classes - 1} exactly once; got "
                         f"{len(out)} entries, {len(set(out))} distinct")
    return out


def split_steps(order: Sequence[int], steps: int, initial: Optional[int] = None) -> List[List[int]]:
    """Cut a class order into training steps: an optional base step of the first ``initial`` classes,
    then ``steps`` equal groups of the rest. Returns the labels of each step, in order."""
    order = [int(c) for c in order]
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps <= 0:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    start = 0
    out: List[List[int]] = []
    if initial is not None:
        if not 0 < initial < len(order):
            raise ValueError(f"the base step needs 0 < initial < {len(order)} classes, got {initial}")
        out.append(order[:initial])
        start = initial
    rest = len(order) - start
    if rest % steps:
        raise ValueError(f"{rest} classes cannot be split into {steps} equal steps: choose a divisor of {rest}")
    k = rest // steps
    out += [order[start + i * k:start + (i + 1) * k] for i in range(steps)]
    return out


@dataclass
class CILSplit:
    """How a benchmark's classes are ordered and cut, and the synthetic base class set: what is recorded."""
    benchmark: str
    steps: int
    order_rule: str                      # "seeded" | "icarl" | "natural" | "given"
    seed: Optional[int]
    class_order: List[int]               # data-set labels in learning order
    classnames: List[str]                # all class names in the data set's label order
    step_classes: List[List[int]]        # data-set labels of each training step
    base_classnames: List[str] = field(default_factory=list)
    order_source: Optional[str] = None   # where the order comes from (ZSCL's file, a --class-order FILE)

    @property
    def num_steps(self) -> int:
        """Training steps, the base step included (steps + 1 for TinyImageNet)."""
        return len(self.step_classes)

    def ordered_classnames(self) -> List[str]:
        """Class names in learning order: position i is the cumulative classifier's label i."""
        return [self.classnames[c] for c in self.class_order]

    def step_offsets(self) -> List[int]:
        """Position in the class order of each step's first class."""
        out, pos = [], 0
        for s in self.step_classes:
            out.append(pos)
            pos += len(s)
        return out

    def record(self) -> dict:
        return {
            "benchmark": self.benchmark, "steps": self.steps, "num_training_steps": self.num_steps,
            "order_rule": self.order_rule, "seed": self.seed, "class_order_source": self.order_source,
            "class_order": list(self.class_order),
            "class_order_names": self.ordered_classnames(),
            "step_classes": [list(s) for s in self.step_classes],
            "step_classnames": [[self.classnames[c] for c in s] for s in self.step_classes],
            "base_classnames": list(self.base_classnames),
            "rule": ("labels are the data set's (torchvision / sorted wnids); class_order lists them in learning "
                     "order; the cumulative classifier's label of a class is its position in class_order"),
        }


def make_split(benchmark: str, steps: int, classnames: Sequence[str], *,
               order: Union[str, Sequence[int]] = "seeded", seed: int = DEFAULT_CLASS_ORDER_SEED,
               base_classnames_: Optional[Sequence[str]] = None, order_source: Optional[str] = None) -> CILSplit:
    """The ``CILSplit`` of ``benchmark`` in ``steps`` incremental steps over ``classnames`` (label order)."""
    proto = protocol(benchmark)
    if len(classnames) != proto.num_classes:
        raise ValueError(f"{benchmark} needs {proto.num_classes} classes, got {len(classnames)}")
    if proto.incremental_classes % int(steps):
        raise ValueError(f"{benchmark}: {proto.incremental_classes} incremental classes cannot be split into "
                         f"{steps} equal steps; the paper uses {', '.join(map(str, proto.paper_steps))}")
    co = class_order(proto.num_classes, order, seed)
    rule = order if isinstance(order, str) else "given"
    if rule == "zscl" and order_source is None:
        order_source = f"ZSCL {ZSCL_ORDER_FILES[proto.dataset]}"
    return CILSplit(benchmark=proto.name, steps=int(steps), order_rule=rule,
                    seed=int(seed) if rule == "seeded" else None, class_order=co, classnames=list(classnames),
                    step_classes=split_steps(co, int(steps), proto.initial_classes),
                    base_classnames=list(base_classnames_ or []), order_source=order_source)


def write_or_check_split(split: CILSplit, record_dir: str) -> str:
    """Write ``split`` to ``record_dir/cil-split.json`` or, when a record is there, check that it is the
    same split (a resumed run on another order would mix the steps); returns the path."""
    os.makedirs(record_dir, exist_ok=True)
    path = os.path.join(record_dir, SPLIT_RECORD_NAME)
    rec = split.record()
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        keys = ("benchmark", "steps", "class_order", "step_classes", "class_order_names", "base_classnames")
        diff = [k for k in keys if old.get(k) != rec[k]]
        if diff:
            raise ValueError(
                f"the class-incremental split differs from the one recorded in {path} ({', '.join(diff)} changed; "
                f"recorded: {old.get('benchmark')} {old.get('steps')} steps, order {old.get('order_rule')} seed "
                f"{old.get('seed')}; now: {rec['benchmark']} {rec['steps']} steps, order {rec['order_rule']} seed "
                f"{rec['seed']}). Use the recorded settings, or start a new run folder.")
    else:
        atomic_write_text(path, json.dumps(rec, indent=1))
    return path


# --------------------------------------------------------------------------- synthetic base class set
_STOP_WORDS = frozenset({"a", "an", "the", "of", "and", "or", "s", "with", "for", "on", "in", "to"})


def _singular(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith("es") and word[:-2].endswith(("s", "x", "ch", "sh")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def name_tokens(name: str) -> frozenset:
    """The content words of a class name: lower case, alphanumeric runs, stop words dropped, plural
    endings removed ("Maple Trees" -> {"maple", "tree"})."""
    return frozenset(_singular(w) for w in re.findall(r"[a-z0-9]+", name.lower()) if w not in _STOP_WORDS)


def base_classnames(downstream: Sequence[str], n: int = 100, seed: int = DEFAULT_BASE_SEED, *,
                    pool: Optional[Sequence[str]] = None, descriptions: Optional[Sequence[str]] = None,
                    exclude: Sequence[int] = ()) -> List[str]:
    """``n`` ImageNet class names that do not overlap the ``downstream`` class names: the synthetic
    base class set of the CIL benchmarks (the paper, Suppl. A: "100 ImageNet class names that do not
    overlap with downstream datasets").

    Rule. The pool is CLIP's 1,000 cleaned ImageNet names (or ``pool``), each with a description
    (by default its WordNet lemmas and gloss, ``imagenet_descriptions``; ``descriptions`` for another
    pool). A pool class is excluded when its index is in ``exclude`` (ImageNet classes that *are*
    downstream classes: TinyImageNet's, by wnid) or when its name or description shares a content
    word (``name_tokens``) with any downstream name. The description catches what the names hide:
    "triceratops" ("huge ceratopsian dinosaur ...") is out because CIFAR100 has "dinosaur",
    "stingray" ("large venomous ray ...") because of "ray". The rule is deliberately conservative
    (a downstream "can" also removes every gloss with the verb "can"): of 1,000 names about 700
    remain for CIFAR100, far more than the 100 needed. Of the rest, the first ``n`` of
    ``numpy.random.default_rng(seed).permutation`` are taken and returned in pool (label) order."""
    if pool is None:
        pool = imagenet_classnames()
        if descriptions is None:
            descriptions = imagenet_descriptions()
    pool = list(pool)
    if descriptions is not None and len(descriptions) != len(pool):
        raise ValueError(f"descriptions has {len(descriptions)} entries for a pool of {len(pool)} names")
    down_tokens = set()
    for d in downstream:
        down_tokens |= name_tokens(d)
    excluded = set(int(i) for i in exclude)
    eligible = []
    for i, p in enumerate(pool):
        tokens = name_tokens(p) | (name_tokens(descriptions[i]) if descriptions is not None else frozenset())
        if i not in excluded and not (tokens & down_tokens):
            eligible.append(i)
    if len(eligible) < n:
        raise ValueError(f"only {len(eligible)} pool class names do not overlap the downstream classes; "
                         f"{n} were asked for")
    perm = np.random.default_rng(int(seed)).permutation(len(eligible))[:n]
    return [pool[eligible[i]] for i in sorted(perm)]


@functools.lru_cache(maxsize=1)
def _imagenet_info():
    """timm's ImageNet-1k metadata (timm ships with open_clip): WordNet ids in label order, lemmas, glosses.
    It replaces the 3,155-line copy this package kept (gift_fast/data/cil_metadata.py); the data are the
    same (tests/test_cil_class_orders.py pins them)."""
    from timm.data import ImageNetInfo

    return ImageNetInfo("imagenet-1k")


def imagenet_wnids() -> List[str]:
    """ImageNet-1k's 1,000 WordNet ids in its label order (the order of CLIP's class names), from timm."""
    return list(_imagenet_info().label_names())


def imagenet_descriptions() -> List[str]:
    """Per ImageNet-1k class (label order): its WordNet lemmas and gloss, "lemmas: gloss" (timm's detailed
    label description); used by ``base_classnames`` to find overlaps that the names alone hide
    ("triceratops: ... dinosaur ...")."""
    return list(_imagenet_info().label_descriptions(detailed=True))


# --------------------------------------------------------------------------- TinyImageNet
TINY_LAYOUT = """\
DIR/tiny-imagenet-200/wnids.txt                     200 WordNet ids, one a line
DIR/tiny-imagenet-200/words.txt                     "<wnid>\\t<name>, <synonym>, ..." a line
DIR/tiny-imagenet-200/train/<wnid>/images/*.JPEG    500 images a class
DIR/tiny-imagenet-200/val/images/val_<k>.JPEG       10,000 images, 50 a class (used as the test set)
DIR/tiny-imagenet-200/val/val_annotations.txt       "<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>" a line
(tiny-imagenet-200.zip from cs231n.stanford.edu unpacked in DIR)"""


def tiny_imagenet_root(data_root: str) -> str:
    """The tiny-imagenet-200 folder: ``data_root/tiny-imagenet-200``, or ``data_root`` itself."""
    data_root = os.path.abspath(os.path.expanduser(str(data_root)))
    for cand in (os.path.join(data_root, "tiny-imagenet-200"), data_root):
        if os.path.isfile(os.path.join(cand, "wnids.txt")):
            return cand
    raise FileNotFoundError(f"TinyImageNet not found under {data_root} (no wnids.txt). Expected layout:\n{TINY_LAYOUT}")


class ImageFiles(Dataset):
    """``(PIL RGB image, int label)`` from a list of image files and their labels."""

    def __init__(self, files: Sequence[str], labels: Sequence[int], classes: Sequence[str]):
        if len(files) != len(labels):
            raise ValueError("files and labels differ in length")
        self.files, self.labels, self.classes = list(files), [int(y) for y in labels], list(classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.files[i]) as im:
            return im.convert("RGB"), self.labels[i]


def _clean_words(entry: str) -> str:
    return re.sub(r"\s+", " ", entry.split(",")[0].replace("_", " ")).strip()


def tiny_imagenet_classnames(wnids: Sequence[str], words_file: Optional[str] = None) -> List[str]:
    """Prompt names of TinyImageNet's ``wnids``: CLIP's cleaned ImageNet name where the wnid is an
    ImageNet-1k class, else the first name of its words.txt line (cleaned)."""
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    names_in = imagenet_classnames()
    words: Dict[str, str] = {}
    if words_file is not None and os.path.exists(words_file):
        with open(words_file, encoding="utf-8") as f:
            for line in f:
                parts = line.rstrip("\n").split("\t", 1)
                if len(parts) == 2:
                    words[parts[0]] = parts[1]
    out = []
    for w in wnids:
        if w in index:
            out.append(names_in[index[w]])
        elif w in words:
            out.append(_clean_words(words[w]))
        else:
            raise ValueError(f"TinyImageNet class {w} is neither an ImageNet-1k wnid nor listed in {words_file}")
    return out


def read_tiny_imagenet(data_root: str) -> dict:
    """The TinyImageNet train and test (= val) sets, as ``ImageFiles`` yielding ``(PIL RGB, label)``:
    ``{"root", "wnids", "classnames", "train", "test"}``. Labels are positions in the sorted wnids.
    Raises FileNotFoundError / ValueError naming what is missing or inconsistent."""
    root = tiny_imagenet_root(data_root)
    with open(os.path.join(root, "wnids.txt")) as f:
        listed = [w.strip() for w in f if w.strip()]
    wnids = sorted(set(listed))
    if len(wnids) != len(listed):
        raise ValueError(f"{root}/wnids.txt lists a wnid twice")
    label = {w: i for i, w in enumerate(wnids)}
    train_files, train_labels = [], []
    for w in wnids:
        d = os.path.join(root, "train", w, "images")
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{d} is missing (class {w} of wnids.txt). Expected layout:\n{TINY_LAYOUT}")
        files = sorted(e for e in os.listdir(d) if e.lower().endswith((".jpeg", ".jpg", ".png")))
        if not files:
            raise ValueError(f"{d} holds no images")
        train_files += [os.path.join(d, e) for e in files]
        train_labels += [label[w]] * len(files)
    ann = os.path.join(root, "val", "val_annotations.txt")
    if not os.path.isfile(ann):
        raise FileNotFoundError(f"{ann} is missing. Expected layout:\n{TINY_LAYOUT}")
    test_files, test_labels = [], []
    with open(ann) as f:
        for n, line in enumerate(f, 1):
            parts = line.strip().split("\t")
            if not parts or not parts[0]:
                continue
            if len(parts) < 2 or parts[1] not in label:
                raise ValueError(f"{ann}, line {n}: {line.strip()!r} does not name a class of wnids.txt")
            p = os.path.join(root, "val", "images", parts[0])
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p} (listed in {ann}, line {n}) is missing")
            test_files.append(p)
            test_labels.append(label[parts[1]])
    order = sorted(range(len(test_files)), key=lambda i: test_files[i])
    test_files = [test_files[i] for i in order]
    test_labels = [test_labels[i] for i in order]
    missing = sorted(set(range(len(wnids))) - set(test_labels))
    if missing:
        raise ValueError(f"{ann} has no test image of {len(missing)} classes (e.g. {wnids[missing[0]]})")
    names = tiny_imagenet_classnames(wnids, os.path.join(root, "words.txt"))
    return {"root": root, "wnids": wnids, "classnames": names,
            "train": ImageFiles(train_files, train_labels, wnids), "test": ImageFiles(test_files, test_labels, wnids)}


# --------------------------------------------------------------------------- class subsets
def dataset_labels(ds) -> np.ndarray:
    """Every sample's label without decoding an image: a ``CachedImageDataset``'s, an ``ImageFiles``', or
    (through ``TransformedDataset``) the wrapped torchvision CIFAR100's."""
    if isinstance(ds, TransformedDataset):
        ds = ds.source
    labels = getattr(ds, "labels", None)
    if labels is None:
        labels = getattr(ds, "targets", None)
    if labels is None:
        raise TypeError(f"cannot read the labels of a {type(ds).__name__} without decoding its images")
    return np.asarray(labels, dtype=np.int64)


class ClassSubset(Dataset):
    """The samples of ``source`` whose label is a key of ``label_map``, relabelled by it:
    ``(image, label_map[source label])``. ``indices`` (into source) and ``labels`` (new) are kept."""

    def __init__(self, source: Dataset, label_map: Dict[int, int], source_labels: Optional[np.ndarray] = None):
        src = dataset_labels(source) if source_labels is None else np.asarray(source_labels, dtype=np.int64)
        self.source, self.label_map = source, {int(k): int(v) for k, v in label_map.items()}
        keep = np.isin(src, np.fromiter(self.label_map, dtype=np.int64, count=len(self.label_map)))
        self.indices = np.nonzero(keep)[0]
        self.labels = np.array([self.label_map[int(y)] for y in src[self.indices]], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        x, _ = self.source[int(self.indices[i])]
        return x, int(self.labels[i])


class CachedClassSubset(ClassSubset):
    """A ``ClassSubset`` of a ``CachedImageDataset`` that keeps its fast path: ``get_batch`` (uint8),
    ``normalize`` and ``iter_batches`` (the cache's own, which needs only these and ``len``)."""

    def __init__(self, source, label_map, source_labels=None):
        super().__init__(source, label_map, source_labels)
        self.mean, self.std, self.image_size = source.mean, source.std, source.image_size

    def get_batch(self, indices):
        import torch
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        x, _ = self.source.get_batch(self.indices[idx])
        return x, torch.from_numpy(self.labels[idx].copy())

    def normalize(self, x):
        return self.source.normalize(x)

    def iter_batches(self, *args, **kw):
        return CachedImageDataset.iter_batches(self, *args, **kw)


def class_subset(source: Dataset, label_map: Dict[int, int], source_labels=None) -> ClassSubset:
    """A ``CachedClassSubset`` over a cache (keeping ``get_batch``), else a plain ``ClassSubset``."""
    cls = CachedClassSubset if isinstance(source, CachedImageDataset) else ClassSubset
    return cls(source, label_map, source_labels)


# --------------------------------------------------------------------------- the benchmark
@dataclass
class CILBenchmark:
    """A class-incremental run's data: one training TaskSpec per step (the step's classes, labels
    0..k-1) and one evaluation TaskSpec per step (every class seen so far, labels = positions in the
    class order; ``train`` is None). ``eval_tasks[t].classnames == tasks[0..t] classnames, concatenated``."""
    protocol: CILProtocol
    split: CILSplit
    tasks: List[TaskSpec]
    eval_tasks: List[TaskSpec]
    base_classnames: List[str]
    record_path: Optional[str] = None

    @property
    def label_smoothing(self) -> float:
        return self.protocol.label_smoothing

    def synth_tasks(self) -> dict:
        """The synthesis task list of this run (``gift-fast synth --task-file``'s JSON): the training
        steps with their class names, and the 100 non-overlapping ImageNet names as the base pool."""
        return {"tasks": [{"name": t.name, "classnames": list(t.classnames),
                           "template": t.meta.get("pool_template", CIL_POOL_TEMPLATE)} for t in self.tasks],
                "base_classnames": list(self.base_classnames)}

    def write_synth_task_file(self, path: str) -> str:
        """Write ``synth_tasks()`` to ``path`` (atomically); returns the path."""
        atomic_write_text(path, json.dumps(self.synth_tasks(), indent=1))
        return path

    @property
    def weight_decay(self) -> float:
        return self.protocol.weight_decay


def build_steps(benchmark: str, split: CILSplit, train: Dataset, test: Dataset, *,
                templates: Optional[Sequence[str]] = None, lr: float = DEFAULT_CIL_LR,
                meta: Optional[dict] = None) -> tuple:
    """The training and evaluation TaskSpecs of ``split`` over full ``train`` / ``test`` sets whose
    labels are the data set's (``split.classnames`` order)."""
    proto = protocol(benchmark)
    tmpl = list(templates) if templates else [CIL_TEMPLATE]
    train_labels, test_labels = dataset_labels(train), dataset_labels(test)
    position = {c: i for i, c in enumerate(split.class_order)}
    tasks, evals = [], []
    seen: List[int] = []
    for t, (cls, offset) in enumerate(zip(split.step_classes, split.step_offsets())):
        seen += cls
        common = {"benchmark": proto.name, "step": t, "num_steps": split.num_steps, "label_offset": offset,
                  "label_smoothing": proto.label_smoothing, "weight_decay": proto.weight_decay, **(meta or {})}
        local = {c: position[c] - offset for c in cls}
        tr = class_subset(train, local, train_labels)
        te = class_subset(test, local, test_labels)
        if len(tr) == 0:
            raise ValueError(f"{proto.name} step {t}: no training image of its classes {cls[:5]}...")
        tasks.append(TaskSpec(name=f"{proto.name}-{split.steps}-step{t:02d}",
                              classnames=[split.classnames[c] for c in cls], templates=tmpl, train=tr, test=te, lr=lr,
                              meta={**common, "classes": list(cls), "train_size": len(tr), "test_size": len(te),
                                    "pool_template": CIL_POOL_TEMPLATE}))
        cum = class_subset(test, {c: position[c] for c in seen}, test_labels)
        evals.append(TaskSpec(name=f"{proto.name}-{split.steps}-seen{t:02d}",
                              classnames=[split.classnames[c] for c in seen], templates=tmpl, train=None, test=cum,
                              lr=lr,
                              meta={**common, "classes": list(seen), "test_size": len(cum)}))
    return tasks, evals


def build_cil(benchmark: str, steps: int, data_root: str, *, order: Union[str, Sequence[int]] = "seeded",
              seed: int = DEFAULT_CLASS_ORDER_SEED, base_seed: int = DEFAULT_BASE_SEED, num_base_classes: int = 100,
              image_size: int = 224, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
              cache_dir: Optional[str] = None, record_dir: Optional[str] = None,
              templates: Optional[Sequence[str]] = None, lr: float = DEFAULT_CIL_LR, download: bool = False,
              num_workers: Optional[int] = None, progress: bool = True,
              order_source: Optional[str] = None) -> CILBenchmark:
    """The class-incremental benchmark ``benchmark`` in ``steps`` steps from ``data_root``.

    CIFAR100 is read with torchvision (``DIR/cifar-100-python``, through ``gift_fast.data.mtil``, so
    MTIL's class check and uint8 cache apply and a cache is shared with MTIL's CIFAR100); TinyImageNet
    from its standard folder layout (module docstring). With ``cache_dir`` the images are decoded once
    into a uint8 cache (``CachedImageDataset``). With ``record_dir`` (the run folder) the split is
    written there, or checked against the one already there."""
    proto = protocol(benchmark)
    mean = tuple(mean) if mean is not None else OPENAI_DATASET_MEAN
    std = tuple(std) if std is not None else OPENAI_DATASET_STD
    if proto.incremental_classes % int(steps):
        raise ValueError(f"{benchmark}: {proto.incremental_classes} incremental classes cannot be split into "
                         f"{steps} equal steps; the paper uses {', '.join(map(str, proto.paper_steps))}")
    data_root = os.path.abspath(os.path.expanduser(str(data_root)))
    if proto.dataset == "CIFAR100":
        # the class-incremental protocol keeps the deterministic transform for training images
        full = build_task("CIFAR100", data_root, image_size=image_size, mean=mean, std=std, download=download,
                          cache_dir=cache_dir, num_workers=num_workers, progress=progress, train_augment=False)
        names, train, test = full.classnames, full.train, full.test
        exclude: List[int] = []
        source = {"data_root": data_root, "reader": "torchvision CIFAR100"}
    else:
        raw = read_tiny_imagenet(data_root)
        names = raw["classnames"]
        if len(names) != proto.num_classes:
            raise ValueError(f"TinyImageNet at {raw['root']} has {len(names)} classes (wnids.txt), expected "
                             f"{proto.num_classes}")
        train, test = (_tiny_split(raw, part, image_size, mean, std, cache_dir, num_workers, progress)
                       for part in ("train", "test"))
        index = {w: i for i, w in enumerate(imagenet_wnids())}
        exclude = [index[w] for w in raw["wnids"] if w in index]
        source = {"data_root": raw["root"], "reader": "tiny-imagenet-200 folders"}
    base = base_classnames(names, num_base_classes, base_seed, exclude=exclude)
    split = make_split(benchmark, steps, names, order=order, seed=seed, base_classnames_=base,
                       order_source=order_source)
    record_path = write_or_check_split(split, record_dir) if record_dir is not None else None
    meta = {**source, "image_size": image_size, "cached": cache_dir is not None}
    tasks, evals = build_steps(benchmark, split, train, test, templates=templates, lr=lr, meta=meta)
    return CILBenchmark(protocol=proto, split=split, tasks=tasks, eval_tasks=evals, base_classnames=base,
                        record_path=record_path)


def _tiny_split(raw: dict, part: str, image_size, mean, std, cache_dir, num_workers, progress) -> Dataset:
    ds: ImageFiles = raw[part]
    if cache_dir is None:
        return TransformedDataset(ds, clip_eval_transform(image_size, mean, std))
    key_parts = {"dataset": "TinyImageNet", "split": part, "files": files_fingerprint(ds.files, raw["root"]),
                 "n_files": len(ds.files), "labels": labels_fingerprint(ds.labels), "wnids": raw["wnids"]}
    return CachedImageDataset(ds, cache_dir, key_parts=key_parts, image_size=image_size, mean=mean, std=std,
                              name=f"TinyImageNet-{part}", num_workers=num_workers, progress=progress)
