"""Training tasks, one module each (align, sft/kd, rba), and their packaged configs under
``configs/``. A task builds its model, data and loss from a config; the trainer runs it."""
