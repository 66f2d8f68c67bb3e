"""Training: options, the Trainer subclass and the train-then-evaluate pipeline."""
