"""What an edge device looks at: originals with questions (and ground truth when known).

Each agent builds its own share of the items from the source description (shard i of n), so no
image crosses Ray: a synthetic split is regenerated deterministically, a dataset is read from
disk (on a multi-node cluster, put the dataset on a path every node can read).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from edge_agents.config import Source


@dataclass
class EdgeItem:
    question_id: str
    question: str
    answers: list[str]  # empty when the ground truth is unknown
    load: Callable[[], Image.Image]
    kind: str | None = None


def load_items(source: Source, shard: int = 0, shards: int = 1) -> list[EdgeItem]:
    """Items shard, shard + shards, ... of the source (every agent gets a disjoint slice)."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard must be in [0, {shards}), got {shard}")
    if source.dataset:
        from collab.data.vqa import load_dataset

        examples = load_dataset(source.dataset, limit=source.limit)
        picked = examples[shard::shards] or examples[shard % max(1, len(examples)) :][:1]
        return [EdgeItem(e.question_id, e.question, list(e.answers), e.load_image, e.kind) for e in picked]
    from collab.data.synthetic import generate_item, parse_split

    seed, n = parse_split(source.synthetic)
    n = min(n, source.limit) if source.limit else n
    if n < 1:
        raise ValueError("the synthetic source has no items (N must be >= 1)")
    indices = list(range(shard, n, shards)) or [shard % n]  # more agents than items: share
    out = []
    for index in indices:
        item = generate_item(seed, index)
        out.append(EdgeItem(item.question_id, item.question, list(item.answers), (lambda im=item.image: im), item.kind))
    return out
