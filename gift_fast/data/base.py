"""What the training loop consumes: one ``TaskSpec`` per task of a continual sequence.

Every source of tasks (the 11 MTIL data sets, the toy world of the tiny preset,
the class-incremental benchmarks) produces these, so the loop has one shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from torch.utils.data import Dataset


@dataclass
class TaskSpec:
    """One task: its classes, its prompts, and its train / test data.

    ``train`` and ``test`` yield ``(image, label)`` with ``image`` a float tensor
    [3, H, W] already preprocessed for the model and ``label`` an int in
    ``range(len(classnames))``.
    """
    name: str
    classnames: List[str]
    templates: List[str]             # format strings with one "{}" for the class name
    train: Optional[Dataset] = None
    test: Optional[Dataset] = None
    lr: float = 1e-5
    meta: dict = field(default_factory=dict)

    def prompts(self, template: Optional[str] = None) -> List[str]:
        """One prompt per class (the first template unless one is given): the CE classifier's text."""
        t = template if template is not None else self.templates[0]
        return [t.format(c) for c in self.classnames]
