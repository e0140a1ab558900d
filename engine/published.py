"""Published one-shot accuracies (%, no fine-tuning) on the shared checkpoints, for tables and plots.

Sources: CBS (Yu et al., ICML 2022) Tables 1-2 (MP, WF, CBS); CHITA (Benbaki et al., ICML 2023) Table 2
(CHITA single-stage, CHITA++ multi-stage). ``dense`` is each paper's dense accuracy (ours: MLPNet 93.97,
ResNet20 91.43).
"""

from __future__ import annotations

__all__ = ["PUBLISHED"]

#: model -> {"dense": accuracy, method: {sparsity: accuracy}}
PUBLISHED = {
    "mlpnet": {
        "dense": 93.97,
        "MP (CBS paper)": {0.5: 93.93, 0.7: 93.62, 0.8: 92.89, 0.9: 90.30, 0.95: 83.64, 0.98: 32.25},
        "WF (CBS paper)": {0.5: 94.02, 0.7: 93.77, 0.8: 93.57, 0.9: 91.69, 0.95: 85.54, 0.98: 38.26},
        "CBS (CBS paper)": {0.5: 93.96, 0.6: 93.96, 0.7: 93.98, 0.8: 93.90, 0.9: 93.14, 0.95: 88.92, 0.98: 55.45},
        "CHITA single-stage": {0.5: 93.97, 0.6: 93.94, 0.7: 93.80, 0.8: 93.59, 0.9: 92.46, 0.95: 88.09, 0.98: 46.25},
        "CHITA++ multi-stage": {0.5: 95.97, 0.6: 95.93, 0.7: 95.89, 0.8: 95.80, 0.9: 95.55, 0.95: 94.70, 0.98: 90.73},
    },
    "resnet20": {
        "dense": 91.36,
        "CBS (CBS paper)": {0.3: 91.35, 0.4: 91.21, 0.5: 90.58, 0.6: 88.88, 0.7: 81.84, 0.8: 51.28, 0.9: 13.68},
        "CHITA single-stage": {0.3: 91.37, 0.4: 91.19, 0.5: 90.60, 0.6: 89.22, 0.7: 84.68, 0.8: 65.70, 0.9: 20.36},
        "CHITA++ multi-stage": {0.3: 91.25, 0.4: 91.20, 0.5: 91.04, 0.6: 90.78, 0.7: 90.38, 0.8: 88.72, 0.9: 79.32},
    },
}
