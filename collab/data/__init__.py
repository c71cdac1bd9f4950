"""Datasets: the synthetic fine-detail VQA benchmark and loaders for local VQA-format datasets.

Re-exports are lazy (PEP 562) so that `python -m collab.data.synthetic` does not import the module
twice, and importing the package stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "collab.data.synthetic": (
        "VOCABULARY",
        "Question",
        "Scene",
        "SceneObject",
        "SyntheticItem",
        "generate_item",
        "generate_items",
        "make_scene",
        "questions_for_scene",
        "render_scene",
        "tokenize_text",
        "write_dataset",
    ),
    "collab.data.vqa": ("VQAExample", "load_dataset", "normalize_answer", "score_predictions", "vqa_accuracy"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'collab.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
