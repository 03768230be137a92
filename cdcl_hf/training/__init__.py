"""Training CDCL / DINO with Accelerate, as named stages; `cdcl_hf.commands.train.main` strings them together.

- `arguments`: the command line, presets and what a run stores of its settings.
- `data`: the screen, its `PlateNormalization`, partner pairing and multi-crop views as one DataLoader.
- `components`: student / EMA teacher, optimizer, schedules, objective, refused distributed setups.
- `step`: `train_step`, one batch: forward, finite check, backward, clip, last-layer freeze, step, EMA.
- `loop`: passes over the data from a resumable position, logging and checkpoints.
- `checkpoints`: the output folder, `TrainingPosition`, saving / finding / loading checkpoints.
- `tracking`: logging set-up, trackers and the step log.
- `export`: the embedding model (teacher backbone + image processor) and the Hub upload.
"""
