"""The paper's published numbers, in one place, and which of them a run's configuration matches.

Transcribed from the paper's text ("Synthetic Data is an Elegant GIFT for Continual Vision-Language
Models", ViT-B/16 CLIP; top-1 accuracy in %). Each table below names the paper's table it comes
from. ``gift-fast report`` prints the matching published row next to a run's numbers, with the
difference (``paper_rows``); ``gift_fast.cil_trainer`` reads the class-incremental tables (Tab. 7, Tab. 8).

Matching (``paper_rows(config, tasks)``): a run is on the paper's MTIL protocol when its tasks are
Order I or Order II and its model, weights and training settings are the paper's (``PROTOCOL``:
ViT-B-16 with OpenAI weights, 1,000 iterations of batch 64 per task with 64 synthetic pairs, the
per-task learning rates, 100 warm-up steps, label smoothing 0.2, tau 2, 1,000 images per task);
then the zero-shot row is comparable, and each published row whose method configuration
(``RowSpec``: CD, ITA, consolidation, distillation loss, teacher, weights, data source) equals the
run's is printed. Anything else (the tiny preset, another model, fewer steps) has no published row,
and the report says which settings differ.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from gift_fast.config import ORDERS
from gift_fast.run_config import upgrade_fields

# ============================================================================ MTIL, Tab. 1 / Tab. 2 and Tab. 9 / Tab. 10
# Tab. 1 (Order I) and Tab. 2 (Order II): {row: (Transfer, Avg., Last)}; None where the paper prints "-".
# Tab. 9 (Order I) and Tab. 10 (Order II), per data set in the order's task order, the last entry being the
# "Average" column: zero_shot / fine_tune (accuracy of the initial CLIP / of fine-tuning on each data set
# alone), then Transfer (10 data sets: the first task has none, then the average), Avg. and Last per row.
# The per-data-set averages equal Tab. 1 / Tab. 2 (tests/test_paper.py checks the transcription).
MTIL_SUMMARY = {
    1: {'Zero-shot': (69.4, 65.3, 65.3),
        'Continual Finetune': (44.6, 55.9, 77.3),
        'baseline': (61.0, 62.7, 75.9),
        'LwF [39]': (56.9, 64.7, 74.6),
        'iCaRL [55]': (50.4, 65.7, 80.1),
        'LwF-VR [12]': (57.2, 65.1, 76.6),
        'WiSE-FT [68]': (52.3, 60.7, 77.7),
        'ZSCL [78]': (68.1, 75.4, 83.6),
        'MoE-Adapter [76]': (68.9, 76.7, 85.0),
        'GIFT (Ours)': (69.3, 77.3, 86.0)},
    2: {'Zero-shot': (65.4, 65.3, 65.3),
        'Continual Finetune': (46.6, 56.2, 67.4),
        'baseline': (60.6, 68.8, 77.2),
        'LwF [39]': (53.2, 62.2, 71.9),
        'iCaRL [55]': (50.9, 56.9, 71.6),
        'LwF-VR [12]': (53.1, 60.6, 68.3),
        'WiSE-FT [68]': (51.0, 61.5, 72.2),
        'ZSCL [78]': (64.2, 74.5, 83.4),
        'MoE-Adapter [76]': (64.3, 74.7, 84.1),
        'GIFT (Ours)': (65.9, 75.7, 85.3)},
}

MTIL_PER_TASK = {
    1: {'zero_shot': (24.3, 88.4, 68.2, 44.6, 54.9, 71.0, 88.5, 59.4, 89.0, 64.7, 65.2, 65.3),
        'fine_tune': (62.0, 95.1, 89.6, 79.5, 98.9, 97.5, 92.7, 99.6, 94.7, 89.6, 81.8, 89.2),
        'transfer': {'Continual Finetune': (67.1, 46.0, 32.1, 35.6, 35.0, 57.7, 44.1, 60.8, 20.5, 46.6, 44.6),
                     'baseline': (83.2, 63.5, 42.9, 44.9, 61.2, 79.5, 63.8, 71.9, 43.9, 54.6, 61.0),
                     'LwF [39]': (74.5, 56.9, 39.1, 51.1, 52.6, 72.8, 60.6, 75.1, 30.3, 55.9, 56.9),
                     'iCaRL [55]': (56.6, 44.6, 32.7, 39.3, 46.6, 68.0, 46.0, 77.4, 31.9, 60.5, 50.4),
                     'LwF-VR [12]': (77.1, 61.0, 40.5, 45.3, 54.4, 74.6, 47.9, 76.7, 36.3, 58.6, 57.2),
                     'WiSE-FT [68]': (73.5, 55.6, 35.6, 41.5, 47.0, 68.3, 53.9, 69.3, 26.8, 51.9, 52.3),
                     'ZSCL [78]': (86.0, 67.4, 45.4, 50.4, 69.1, 87.6, 61.8, 86.8, 60.1, 66.8, 68.1),
                     'MoE-Adapter [76]': (87.9, 68.2, 44.4, 49.9, 70.7, 88.7, 59.7, 89.1, 64.5, 65.5, 68.9),
                     'GIFT (Ours)': (88.5, 69.8, 46.0, 49.4, 68.5, 87.1, 69.9, 88.9, 57.7, 67.7, 69.3)},
        'avg': {'Continual Finetune': (25.5, 81.5, 59.1, 53.2, 64.7, 51.8, 63.2, 64.3, 69.7, 31.8, 49.7, 55.9),
                'baseline': (24.0, 82.3, 68.2, 58.2, 70.9, 67.0, 76.2, 57.1, 77.5, 51.4, 56.9, 62.7),
                'LwF [39]': (36.3, 86.9, 72.0, 59.0, 73.7, 60.0, 73.6, 74.8, 80.0, 37.3, 58.1, 64.7),
                'iCaRL [55]': (35.5, 89.2, 72.2, 60.6, 68.8, 70.0, 78.2, 62.3, 81.8, 41.2, 62.5, 65.7),
                'LwF-VR [12]': (29.6, 87.7, 74.4, 59.5, 72.4, 63.6, 77.0, 66.7, 81.2, 43.7, 60.7, 65.1),
                'WiSE-FT [68]': (26.7, 86.5, 64.3, 57.1, 65.7, 58.7, 71.1, 70.5, 75.8, 36.9, 54.6, 60.7),
                'ZSCL [78]': (45.1, 92.0, 80.1, 64.3, 79.5, 81.6, 89.6, 75.2, 88.9, 64.7, 68.0, 75.4),
                'MoE-Adapter [76]': (50.2, 91.9, 83.1, 69.4, 78.9, 84.0, 89.1, 73.7, 89.3, 67.7, 66.9, 76.7),
                'GIFT (Ours)': (51.9, 93.9, 81.4, 67.7, 80.3, 82.8, 89.3, 80.6, 90.3, 63.1, 68.9, 77.3)},
        'last': {'Continual Finetune': (31.0, 89.3, 65.8, 67.3, 88.9, 71.1, 85.6, 99.6, 92.9, 77.3, 81.1, 77.3),
                 'baseline': (22.4, 91.1, 80.8, 69.2, 93.5, 81.2, 90.5, 49.4, 92.7, 83.8, 80.1, 75.9),
                 'LwF [39]': (26.3, 87.5, 71.9, 66.6, 79.9, 66.9, 83.8, 99.6, 92.1, 66.1, 80.4, 74.6),
                 'iCaRL [55]': (35.8, 93.0, 77.0, 70.2, 83.3, 88.5, 90.4, 86.7, 93.2, 81.2, 81.9, 80.1),
                 'LwF-VR [12]': (20.5, 89.8, 72.3, 67.6, 85.5, 73.8, 85.7, 99.6, 93.1, 73.3, 80.9, 76.6),
                 'WiSE-FT [68]': (27.2, 90.8, 68.0, 68.9, 86.9, 74.0, 87.6, 99.6, 92.6, 77.8, 81.3, 77.7),
                 'ZSCL [78]': (40.6, 92.2, 81.3, 70.5, 94.8, 90.5, 91.9, 98.7, 93.9, 85.3, 80.2, 83.6),
                 'MoE-Adapter [76]': (49.8, 92.2, 86.1, 78.1, 95.7, 94.3, 89.5, 98.1, 89.9, 81.6, 80.0, 85.0),
                 'GIFT (Ours)': (47.9, 95.6, 82.8, 75.1, 97.3, 94.2, 91.7, 99.2, 94.2, 87.0, 80.9, 86.0)}},
    2: {'zero_shot': (64.7, 88.5, 59.4, 89.0, 71.0, 65.2, 24.3, 88.4, 44.6, 54.9, 68.2, 65.3),
        'fine_tune': (89.6, 92.7, 94.7, 94.7, 97.5, 81.8, 62.0, 95.1, 79.5, 98.9, 89.6, 89.2),
        'transfer': {'Continual Finetune': (85.9, 59.6, 57.9, 40.0, 46.7, 11.1, 70.0, 30.5, 26.6, 37.7, 46.6),
                     'baseline': (87.0, 62.3, 83.7, 60.6, 62.1, 19.3, 86.6, 42.7, 41.4, 60.1, 60.6),
                     'LwF [39]': (87.8, 58.5, 71.9, 46.6, 57.3, 12.8, 81.4, 34.5, 34.5, 46.8, 53.2),
                     'iCaRL [55]': (86.1, 51.8, 67.6, 50.4, 57.9, 11.0, 72.3, 31.2, 32.7, 48.1, 50.9),
                     'LwF-VR [12]': (88.2, 57.0, 71.4, 50.0, 58.0, 13.0, 82.0, 34.4, 29.3, 47.6, 53.1),
                     'WiSE-FT [68]': (87.2, 57.6, 67.0, 45.0, 54.0, 12.9, 78.6, 35.5, 28.4, 44.3, 51.0),
                     'ZSCL [78]': (88.3, 57.5, 84.7, 68.1, 64.8, 21.1, 88.2, 45.3, 55.2, 68.2, 64.2),
                     'MoE-Adapter [76]': (88.8, 59.5, 89.1, 69.9, 64.4, 18.1, 86.9, 43.7, 54.6, 68.2, 64.3),
                     'GIFT (Ours)': (88.3, 63.4, 88.1, 70.8, 67.7, 22.8, 90.4, 46.7, 51.8, 68.8, 65.9)},
        'avg': {'Continual Finetune': (42.1, 70.5, 92.2, 80.1, 54.5, 59.1, 19.8, 78.3, 41.0, 38.1, 42.3, 56.2),
                'baseline': (69.9, 86.2, 91.9, 89.0, 74.0, 69.1, 23.2, 88.6, 51.1, 50.8, 62.6, 68.8),
                'LwF [39]': (49.0, 77.0, 92.1, 85.9, 66.5, 67.2, 20.9, 84.7, 44.6, 45.5, 50.5, 62.2),
                'iCaRL [55]': (52.0, 75.9, 77.4, 74.6, 58.4, 59.3, 11.7, 79.6, 42.1, 43.2, 51.7, 56.9),
                'LwF-VR [12]': (44.9, 75.8, 91.8, 85.3, 63.5, 67.6, 16.9, 84.9, 44.0, 40.6, 51.3, 60.6),
                'WiSE-FT [68]': (52.6, 79.3, 91.9, 83.9, 63.4, 65.2, 23.3, 83.7, 45.4, 40.0, 48.2, 61.5),
                'ZSCL [78]': (81.7, 91.3, 91.1, 91.0, 82.9, 72.5, 33.6, 89.7, 53.3, 62.8, 69.9, 74.5),
                'MoE-Adapter [76]': (84.9, 89.9, 89.3, 91.4, 86.2, 72.2, 33.4, 89.4, 53.3, 61.4, 69.9, 74.7),
                'GIFT (Ours)': (83.2, 90.8, 92.6, 92.8, 85.8, 74.1, 36.0, 92.1, 54.7, 60.0, 70.4, 75.7)},
        'last': {'Continual Finetune': (24.0, 67.3, 99.1, 87.4, 44.3, 67.0, 29.5, 92.3, 61.3, 81.0, 88.1, 67.4),
                 'baseline': (65.1, 84.2, 96.4, 90.2, 71.8, 74.8, 28.8, 91.4, 70.7, 88.2, 87.2, 77.2),
                 'LwF [39]': (34.6, 69.6, 99.3, 88.7, 61.1, 72.5, 32.5, 88.1, 65.6, 90.9, 87.9, 71.9),
                 'iCaRL [55]': (46.0, 81.5, 91.3, 82.8, 66.5, 72.2, 16.3, 91.6, 68.1, 83.2, 87.8, 71.6),
                 'LwF-VR [12]': (27.4, 61.2, 99.4, 86.3, 60.6, 70.7, 23.4, 88.0, 61.3, 84.3, 88.1, 68.3),
                 'WiSE-FT [68]': (35.6, 76.9, 99.5, 89.1, 62.1, 71.8, 27.8, 90.8, 67.0, 85.6, 87.6, 72.2),
                 'ZSCL [78]': (78.2, 91.1, 97.6, 92.5, 87.4, 78.2, 45.0, 92.3, 72.7, 96.2, 86.3, 83.4),
                 'MoE-Adapter [76]': (84.1, 88.5, 94.0, 91.8, 94.1, 77.8, 50.4, 93.3, 77.1, 87.7, 86.6, 84.1),
                 'GIFT (Ours)': (81.0, 90.2, 98.6, 94.0, 91.5, 78.6, 51.7, 94.6, 75.6, 95.4, 86.6, 85.3)}},
}

TABLE_OF_ORDER = {1: "Tab. 1", 2: "Tab. 2"}
PER_TASK_TABLE_OF_ORDER = {1: "Tab. 9", 2: "Tab. 10"}

# ============================================================================ ablations (MTIL Order I)
@dataclass(frozen=True)
class RowSpec:
    """The method configuration of a published row (a run matches when its own equals it)."""
    cd: bool
    ita: bool
    consolidation: str                   # none | uniform | adaptive | static
    distill: str = "contrastive"
    teacher: str = "last"
    ita_weight: float = 0.25
    images_per_task: int = 1000
    source: str = "synthetic"            # synthetic | reference (real images, --reference-images)
    fisher_samples: Optional[int] = None   # EWC-V: synthetic pairs of the static Fisher (batches x batch size)
    sd_steps: Optional[int] = None       # on-the-fly Stable Diffusion steps (None: any, e.g. a synth folder)


GIFT = RowSpec(True, True, "adaptive")
CD_ITA_L2 = RowSpec(True, True, "uniform")          # "synthetic data-based distillation" on the L2 baseline (Sec. 4.4)


@dataclass(frozen=True)
class PaperRow:
    table: str                           # "Tab. 3", ...
    row: str                             # the row as the paper names it
    order: int                           # 1 | 2
    spec: RowSpec
    values: Tuple[Optional[float], Optional[float], Optional[float]]   # Transfer, Avg., Last
    per_task_row: Optional[str] = None   # its row name in Tab. 9 / Tab. 10
    note: str = ""


# Rows of Tab. 1 / Tab. 2 that a gift-fast method reproduces.
_MAIN_ROWS = (("Continual Finetune", RowSpec(False, False, "none")), ("baseline", RowSpec(False, False, "uniform")),
              ("GIFT (Ours)", GIFT))

# The ablations, all on MTIL Order I. Rows whose configuration the extracted text leaves ambiguous are
# left out: Tab. 3's first (ITA alone) and fourth rows (the check marks were lost in extraction), and
# Tab. 4 (c)'s two largest ITA scales (their values were lost); Tab. 5's "Synthetic" rows generated
# from ImageNet labels alone and the ZSCL row have no gift-fast configuration; Tab. 12 varies the
# guidance scale, which `gift-fast train` does not set.
ABLATIONS: Tuple[PaperRow, ...] = (
    # Tab. 3: components added to the L2 baseline
    PaperRow("Tab. 3", "Baseline", 1, RowSpec(False, False, "uniform"), (61.0, 62.7, 75.9)),
    PaperRow("Tab. 3", "+CD", 1, RowSpec(True, False, "uniform"), (68.3, 76.3, 84.7)),
    PaperRow("Tab. 3", "+CD +ITA", 1, CD_ITA_L2, (68.9, 76.6, 85.0)),
    PaperRow("Tab. 3", "+CD +ITA +AWC", 1, GIFT, (69.3, 77.3, 86.0)),
    # Tab. 4 (a): the distillation loss, on the L2 baseline with CD and ITA
    # (the feature distance replaces L_cd and ITA stays on beside it, in the authors' --feature_mse run as in
    # gift_fast.step.distillation_loss)
    PaperRow("Tab. 4a", "Feat. Dist.", 1, RowSpec(True, True, "uniform", distill="feature"), (64.0, 71.6, 80.5)),
    PaperRow("Tab. 4a", "Image-only", 1, RowSpec(True, True, "uniform", distill="image_only"), (66.8, 75.1, 84.1)),
    PaperRow("Tab. 4a", "Text-only", 1, RowSpec(True, True, "uniform", distill="text_only"), (64.7, 71.9, 81.8)),
    PaperRow("Tab. 4a", "Contrastive", 1, CD_ITA_L2, (68.9, 76.6, 85.0)),
    # Tab. 4 (b): the teacher (WiSE(a) = a * initial + (1 - a) * last, gift-fast's --teacher wise:a)
    PaperRow("Tab. 4b", "Initial CLIP", 1, RowSpec(True, True, "uniform", teacher="initial"), (69.1, 74.0, 80.1)),
    PaperRow("Tab. 4b", "Last CLIP", 1, CD_ITA_L2, (68.9, 76.6, 85.0)),
    PaperRow("Tab. 4b", "WiSE(0.2)", 1, RowSpec(True, True, "uniform", teacher="wise:0.2"), (69.1, 76.1, 83.4)),
    PaperRow("Tab. 4b", "WiSE(0.5)", 1, RowSpec(True, True, "uniform", teacher="wise:0.5"), (69.6, 75.3, 81.6)),
    # Tab. 4 (c): the ITA scale with lambda_cd = 1 (0: CD alone, the same run as Tab. 3's +CD)
    PaperRow("Tab. 4c", "ITA scale 0", 1, RowSpec(True, False, "uniform"), (68.3, 76.3, 84.7)),
    PaperRow("Tab. 4c", "ITA scale 0.25", 1, CD_ITA_L2, (68.9, 76.6, 85.0)),
    # Tab. 5: real ImageNet images instead of synthetic ones (1K / 3K a task)
    PaperRow("Tab. 5", "GIFT, ImageNet, 1K", 1, RowSpec(True, True, "uniform", source="reference"),
             (69.0, 76.0, 84.0), note="the paper's real images are ImageNet's"),
    PaperRow("Tab. 5", "GIFT, Synthetic, 1K", 1, CD_ITA_L2, (68.9, 76.6, 85.0)),
    PaperRow("Tab. 5", "GIFT, ImageNet, 3K", 1, RowSpec(True, True, "uniform", images_per_task=3000,
                                                        source="reference"), (69.3, 76.6, 84.7),
             note="the paper's real images are ImageNet's"),
    PaperRow("Tab. 5", "GIFT, Synthetic, 3K", 1, RowSpec(True, True, "uniform", images_per_task=3000),
             (69.1, 76.7, 84.9)),
    # Tab. 6: EWC-V (a static Fisher from synthetic samples before each task) against AWC
    PaperRow("Tab. 6", "EWC-V, 64 samples", 1, RowSpec(True, True, "static", fisher_samples=64), (65.8, 75.6, 85.6)),
    PaperRow("Tab. 6", "EWC-V, 128 samples", 1, RowSpec(True, True, "static", fisher_samples=128),
             (66.8, 76.1, 85.9)),
    PaperRow("Tab. 6", "EWC-V, 256 samples", 1, RowSpec(True, True, "static", fisher_samples=256),
             (68.0, 76.8, 86.2)),
    PaperRow("Tab. 6", "AWC", 1, GIFT, (69.3, 77.3, 86.0)),
    # Tab. 11 (supplementary D): Stable Diffusion with 25 denoising steps (50 is the default, Tab. 1 / 3)
    PaperRow("Tab. 11", "GIFT w/ AWC, 25 steps", 1, RowSpec(True, True, "adaptive", sd_steps=25), (69.2, 77.2, 85.8)),
    PaperRow("Tab. 11", "GIFT w/o AWC, 25 steps", 1, RowSpec(True, True, "uniform", sd_steps=25), (69.2, 76.6, 84.8)),
)

# ============================================================================ the protocol a run must follow
# TrainConfig fields and the paper's values (Sec. 4.1 and the supplementary's implementation details).
PROTOCOL: Dict[str, Any] = {"model": "ViT-B-16", "pretrained": "openai", "steps": 1000, "batch_size": 64,
                            "syn_batch_size": 64, "warmup": 100, "lr": None, "label_smoothing": 0.2,
                            "temperature": 2.0, "cd_weight": 1.0, "consolidation_weight": 1.0,
                            "awc_decay": 0.0}
PROTOCOL_TEXT = ("ViT-B-16 (openai), MTIL Order I or II, 1000 steps per task, batches of 64 (+ 64 synthetic), "
                 "the per-task learning rates, warm-up 100, label smoothing 0.2, tau 2, lambda_cd 1, lambda_l2 1")


def mtil_order_of(tasks: Sequence[str]) -> Optional[int]:
    return next((o for o, seq in ORDERS.items() if list(seq) == list(tasks)), None)


def protocol_differences(config: Dict[str, Any], tasks: Sequence[str]) -> List[str]:
    """What keeps a run (its TrainConfig as a dict, its task names) off the paper's MTIL protocol."""
    diff = []
    if mtil_order_of(tasks) is None:
        diff.append(f"tasks {', '.join(tasks)} (not MTIL Order I or II)")
    for k, v in PROTOCOL.items():
        if k in config and config[k] != v:
            diff.append(f"{k} {config[k]!r} (paper: {v!r})")
    return diff


def run_spec(config: Dict[str, Any], method: Dict[str, Any]) -> RowSpec:
    """A run's RowSpec from its TrainConfig dict and its resolved method (config.json's "method")."""
    distills = method["cd"] or method["ita"]
    cons = method["consolidation"]
    return RowSpec(cd=bool(method["cd"]), ita=bool(method["ita"]), consolidation=cons,
                   distill=method.get("distill", "contrastive") if distills else "contrastive",
                   teacher=method.get("teacher", "last") if distills else "last",
                   ita_weight=float(config.get("ita_weight", 0.25)) if method["ita"] else 0.25,
                   images_per_task=int(config.get("images_per_task", 1000)) if distills or cons == "static" else 1000,
                   source="reference" if config.get("reference_images") else "synthetic",
                   fisher_samples=(int(config.get("fisher_batches", 10)) * int(config.get("syn_batch_size", 64))
                                   if cons == "static" else None),
                   sd_steps=int(config.get("sd_steps", 50)) if config.get("synth") == "on-the-fly" else None)


def _matches(row: RowSpec, run: RowSpec) -> bool:
    if row.sd_steps is None and run.sd_steps not in (None, 50):
        return False                      # the paper's default rows used 50 denoising steps
    if row.sd_steps is not None and run.sd_steps != row.sd_steps:
        return False
    return (row.cd, row.ita, row.consolidation, row.distill, row.teacher, row.ita_weight, row.images_per_task,
            row.source, row.fisher_samples) == (run.cd, run.ita, run.consolidation, run.distill, run.teacher,
                                                run.ita_weight, run.images_per_task, run.source, run.fisher_samples)


def main_rows() -> List[PaperRow]:
    """The rows of Tab. 1 / Tab. 2 that a gift-fast method reproduces (with their Tab. 9 / Tab. 10 rows)."""
    return [PaperRow(TABLE_OF_ORDER[o], name, o, spec, MTIL_SUMMARY[o][name], per_task_row=name)
            for o in (1, 2) for name, spec in _MAIN_ROWS]


@dataclass
class PaperMatch:
    """What the paper publishes for one run's protocol and configuration."""
    order: Optional[int]
    differences: List[str] = field(default_factory=list)      # empty: on the paper's protocol
    rows: List[PaperRow] = field(default_factory=list)

    @property
    def on_protocol(self) -> bool:
        return not self.differences

    def zero_shot(self) -> Optional[Tuple[Optional[float], Optional[float], Optional[float]]]:
        return MTIL_SUMMARY[self.order]["Zero-shot"] if self.on_protocol else None


def paper_rows(config: Dict[str, Any], method: Dict[str, Any], tasks: Sequence[str]) -> PaperMatch:
    """The published rows for a run (its TrainConfig dict, resolved method and task names; as any gift-fast
    version wrote them in config.json: old names and spellings are read as today's)."""
    config = upgrade_fields(config)
    method = upgrade_fields(method)
    order = mtil_order_of(tasks)
    diff = protocol_differences(config, tasks)
    if diff:
        return PaperMatch(order, diff)
    spec = run_spec(config, method)
    rows = [r for r in main_rows() + list(ABLATIONS) if r.order == order and _matches(r.spec, spec)]
    return PaperMatch(order, [], rows)


def per_task_values(order: int, row: str, metric: str) -> Tuple[float, ...]:
    """Tab. 9 / Tab. 10 values of ``row`` for ``metric`` (transfer: 10 data sets + average; else 11 + average)."""
    return MTIL_PER_TASK[order][metric][row]


# ============================================================================ class-incremental, Tab. 7 / Tab. 8
# ViT/ResNet rows as published; CLIP rows ViT-B/16. Supplementary Tab. 7 (CIFAR100) and Tab. 8
# (TinyImageNet): {steps: {method: (Avg, Last)}}; None where the table has "-".
CIL_RESULTS: Dict[str, Dict[int, Dict[str, tuple]]] = {
    "cifar100-cil": {
        10: {"UCIR": (58.66, 43.39), "BiC": (68.80, 53.54), "RPSNet": (68.60, 57.05), "PODNet": (58.03, 41.05),
             "DER": (74.64, 64.35), "DyTox+": (74.10, 62.34), "CLIP Zero-shot": (74.47, 65.92),
             "CLIP Fine-tune": (65.46, 53.23), "LwF": (65.86, 48.04), "iCaRL": (79.35, 70.97),
             "LwF-VR": (78.81, 70.75), "ZSCL": (82.15, 73.65), "GIFT": (85.11, 77.70)},
        20: {"UCIR": (58.17, 40.63), "BiC": (66.48, 47.02), "RPSNet": (None, None), "PODNet": (53.97, 35.02),
             "DER": (73.98, 62.55), "DyTox+": (71.62, 57.43), "CLIP Zero-shot": (75.20, 65.74),
             "CLIP Fine-tune": (59.69, 43.13), "LwF": (60.64, 40.56), "iCaRL": (73.32, 64.55),
             "LwF-VR": (74.54, 63.54), "ZSCL": (80.39, 69.58), "GIFT": (82.11, 73.73)},
        50: {"UCIR": (56.86, 37.09), "BiC": (62.09, 41.04), "RPSNet": (None, None), "PODNet": (51.19, 32.99),
             "DER": (72.05, 59.76), "DyTox+": (68.90, 51.09), "CLIP Zero-shot": (75.67, 65.94),
             "CLIP Fine-tune": (39.23, 18.89), "LwF": (47.69, 32.90), "iCaRL": (71.28, 59.07),
             "LwF-VR": (71.02, 59.45), "ZSCL": (79.92, 67.36), "GIFT": (80.81, 71.29)},
    },
    "tinyimagenet-cil": {
        5: {"EWC": (19.01, 6.00), "EEIL": (47.17, 35.12), "UCIR": (50.30, 39.42), "MUC": (32.23, 19.20),
            "PASS": (49.54, 41.64), "DyTox": (55.58, 47.23), "CLIP Zero-shot": (69.62, 65.30),
            "CLIP Fine-tune": (61.54, 46.66), "LwF": (60.97, 48.77), "iCaRL": (77.02, 70.39),
            "LwF-VR": (77.56, 70.89), "ZSCL": (80.27, 73.57), "GIFT": (81.16, 77.04)},
        10: {"EWC": (15.82, 3.79), "EEIL": (45.03, 34.64), "UCIR": (48.58, 37.29), "MUC": (26.67, 15.33),
             "PASS": (47.19, 39.27), "DyTox": (52.26, 42.79), "CLIP Zero-shot": (69.55, 65.59),
             "CLIP Fine-tune": (57.05, 41.54), "LwF": (57.60, 44.00), "iCaRL": (73.48, 65.97),
             "LwF-VR": (74.12, 67.05), "ZSCL": (78.61, 71.62), "GIFT": (80.20, 75.51)},
        20: {"EWC": (12.35, 4.73), "EEIL": (40.41, 29.72), "UCIR": (42.84, 30.85), "MUC": (21.89, 10.32),
             "PASS": (42.01, 32.93), "DyTox": (46.18, 36.21), "CLIP Zero-shot": (69.49, 65.30),
             "CLIP Fine-tune": (54.62, 44.55), "LwF": (54.79, 42.26), "iCaRL": (69.65, 64.68),
             "LwF-VR": (69.94, 63.89), "ZSCL": (77.18, 68.30), "GIFT": (79.32, 74.87)},
    },
}
CIL_TABLE_NAMES = {"cifar100-cil": "Tab. 7", "tinyimagenet-cil": "Tab. 8"}


__all__ = ["MTIL_SUMMARY", "MTIL_PER_TASK", "ABLATIONS", "PROTOCOL", "PaperRow", "RowSpec", "PaperMatch", "paper_rows",
           "protocol_differences", "per_task_values", "main_rows", "CIL_RESULTS", "CIL_TABLE_NAMES",
           "TABLE_OF_ORDER", "PER_TASK_TABLE_OF_ORDER"]
