"""Training the embedded model: `python -m collab.training --recipe configs/training/embedded.yaml --out DIR`.

recipe (the typed recipe file), loop (device, schedule, loaders), tower (stage 1), data and vlm
(stage 2), monitor (what is measured while training), train (the stages in order), plots (curves).
"""
