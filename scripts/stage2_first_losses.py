"""The first stage-2 batches of a recipe part and the fresh model's losses on them, to the last digit.

    python scripts/stage2_first_losses.py --recipe configs/training/v29.yaml --part 4 \
        --tower models/collab-tiny-llava [--batches 3] [--decoder-seed 30] [--torch-seed 1]

Where two runs of one part diverge, this tells the data and the fresh model (the same printout)
from what happens later in training. Run it under other code (a `git worktree` of an older commit
first on PYTHONPATH) or other library versions and compare the printouts. The batches come through
the training loader with one data worker, after seeding torch with --torch-seed: a different seed
must not change them (the stream seeds its own generators).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from collab.data.synthetic import VOCABULARY
from collab.models.tiny import build_tiny_llava, build_tokenizer
from collab.training.data import BatchStream, answer_loss
from collab.training.loop import make_loader
from collab.training.recipe import load_recipe
from collab.training.train import batch_spec, tower_state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", type=Path, required=True)
    p.add_argument("--part", type=int, default=0, help="the recipe part (0: the first)")
    p.add_argument("--tower", type=Path, required=True, help="a saved model directory or stage-1 checkpoint")
    p.add_argument("--batches", type=int, default=3)
    p.add_argument(
        "--decoder-seed",
        type=int,
        help="seed the fresh decoder is drawn at (default: the recipe's decoder_seed, or seed)",
    )
    p.add_argument("--torch-seed", type=int, default=0, help="torch's global seed before the loader starts")
    args = p.parse_args(argv)
    recipe = load_recipe(args.recipe)
    part = recipe.parts()[args.part].recipe
    tokenizer = build_tokenizer(VOCABULARY)
    # The stream and the model are built here with what the code of older commits also has (not
    # train.initial_model or train_vlm's stream), so that the script runs under them: a model built
    # at the decoder's seed, its tower replaced, is the fresh model initial_model makes.
    seed = args.decoder_seed
    if seed is None:
        seed = getattr(recipe, "decoder_seed", None)
    if seed is None:
        seed = recipe.seed
    model = build_tiny_llava(tokenizer, recipe.model.spec(), seed=seed)
    model.set_attn_implementation("sdpa")  # as training runs it
    model.model.vision_tower.load_state_dict(tower_state(args.tower))
    model.train()
    torch.set_num_threads(part.runtime.vlm_threads or part.runtime.threads)
    torch.manual_seed(args.torch_seed)
    stream = BatchStream(
        batch_spec(part),
        tokenizer,
        part.vlm.batch,
        part.seed,
        [list(c) for c in part.vlm.curriculum],
        part.vlm.local_fraction,
        scene_reuse=part.runtime.scene_reuse,
        global_objects=part.vlm.global_objects,
    )
    loader = make_loader(stream, 1, torch.device("cpu"))
    for step, batch in zip(range(args.batches), loader):
        with torch.no_grad():
            loss, _, _ = answer_loss(model, batch, part.vlm.eos_weight)
        print(
            f"batch {step}: token ids sum {batch['input_ids'].sum().item()}, "
            f"pixels sum {batch['pixel_values'].double().sum().item()!r}, loss {loss.item()!r}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
