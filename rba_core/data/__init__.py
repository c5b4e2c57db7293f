"""What goes into a model: the audio front end, the tokenizer and chat templates, the prompts of
each task, and the speech dataset (manifest rows -> padded batches)."""
