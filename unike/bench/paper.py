"""The paper's reported numbers (Pan et al., NeurIPS 2024; MiniGPT-4 rows), to print beside ours.

Tables 1–4 and Fig. 4c as transcribed in the method reference (§G). Scores are in the order of
`PAPER_METRICS`; the paper has no CI-Loc / RI-Loc probes. Keys are our method names (`unike.bench.methods`).
"""
from __future__ import annotations

PAPER_METRICS = ("rel", "t_gen", "m_gen", "t_loc", "m_loc")
MODEL = "MiniGPT-4"
TASK_NAMES = {"vqa": "E-VQA", "caption": "E-IC", "cross": "E-VQA + E-IC"}


def _row(*values: float) -> dict[str, float]:
    return dict(zip(PAPER_METRICS, values))


# Table 1 (one-step). "latentike" is Table 4 row 2 (the paper has no stand-alone latent-IKE row in Table 1).
ONE_STEP = {
    "vqa": {"base": _row(0.0, 0.0, 0.0, 100.0, 100.0), "ftlast": _row(70.1, 65.7, 63.9, 72.6, 65.8),
            "tpatcher": _row(83.0, 68.2, 66.0, 84.8, 82.0), "promptike": _row(100.0, 94.9, 90.5, 50.3, 3.7),
            "latentike": _row(94.6, 92.2, 93.3, 54.1, 30.5), "unike": _row(98.0, 97.4, 92.8, 98.7, 88.8)},
    "caption": {"base": _row(0.0, 0.0, 0.0, 100.0, 100.0), "ftlast": _row(67.4, 65.1, 62.8, 63.5, 52.7),
                "tpatcher": _row(83.8, 72.3, 67.7, 93.9, 83.6), "promptike": _row(90.9, 81.6, 88.5, 52.2, 4.7),
                "latentike": _row(89.6, 85.9, 84.4, 59.0, 36.8), "unike": _row(96.8, 95.7, 92.4, 98.9, 87.3)},
}

# Table 2 (sequential), keyed by (task, K).
SEQUENTIAL = {
    ("vqa", 10): {"ftlast": _row(67.8, 62.4, 58.3, 66.9, 62.3), "tpatcher": _row(79.2, 62.5, 61.4, 83.4, 79.5),
                  "unike": _row(91.5, 87.1, 85.4, 88.9, 83.1)},
    ("vqa", 20): {"ftlast": _row(64.9, 59.6, 57.9, 62.6, 61.7), "tpatcher": _row(76.6, 56.6, 54.8, 81.5, 78.2),
                  "unike": _row(88.9, 83.4, 81.2, 85.7, 79.6)},
    ("caption", 10): {"ftlast": _row(65.3, 63.8, 61.9, 58.9, 49.8), "tpatcher": _row(80.7, 67.5, 63.6, 89.5, 80.6),
                      "unike": _row(91.8, 90.4, 89.1, 93.5, 85.0)},
    ("caption", 20): {"ftlast": _row(64.0, 63.1, 60.6, 56.4, 48.2), "tpatcher": _row(76.0, 64.1, 60.0, 88.8, 79.8),
                      "unike": _row(88.4, 87.2, 85.6, 90.1, 81.1)},
}

# Table 3 (cross-task, K = 10 = 5 E-VQA + 5 E-IC).
CROSS = {"ftlast": _row(65.0, 63.2, 59.4, 57.3, 52.2), "tpatcher": _row(79.0, 63.2, 61.2, 84.0, 79.8),
         "unike": _row(90.7, 88.2, 86.8, 90.4, 83.8)}

# Table 4 (ablation, one-step).
ABLATION = {
    "vqa": {"intrin-only": _row(83.5, 69.2, 67.4, 85.3, 83.1), "latent-only": _row(94.6, 92.2, 93.3, 54.1, 30.5),
            "intrin+prompt-ike": _row(95.5, 79.0, 71.8, 63.8, 50.1), "no-collab": _row(95.9, 93.2, 89.6, 95.2, 85.3),
            "unike": ONE_STEP["vqa"]["unike"]},
    "caption": {"intrin-only": _row(85.7, 73.3, 68.5, 94.1, 84.4), "latent-only": _row(89.6, 85.9, 84.4, 59.0, 36.8),
                "intrin+prompt-ike": _row(89.9, 77.2, 74.4, 61.0, 59.4),
                "no-collab": _row(96.5, 92.4, 89.7, 95.2, 85.5), "unike": ONE_STEP["caption"]["unike"]},
}

# Fig. 4c (E-VQA): generality (mean of T-Gen, M-Gen) and locality (mean of T-Loc, M-Loc) per ζ treatment.
# Fig. 4b (fixed α) has no legible numbers.
ZETA = {"zeta-none": {"gen": 91.6, "loc": 91.7}, "zeta-random": {"gen": 86.5, "loc": 86.2},
        "zeta-semantic": {"gen": 91.1, "loc": 90.6}, "unike": {"gen": 95.1, "loc": 93.8}}
