"""Evaluation: the teacher, baselines and RBA on the same held-out items (``rba eval``).

- ``answers``: answer scores shared with the RL step's held-out check (teacher gap, chrF, ...).
- ``bootstrap``: seeded percentile intervals and paired differences.
- ``ifeval`` / ``nq``: the public benchmarks' data and checkers, read from installed packages.
- ``speech``: benchmark prompts spoken by rba's TTS in held-out voices, cached.
- ``systems``: the teacher reading the text and the SpeechLM hearing the audio.
- ``suites``: synth, ifeval, nq and translate as items and per-item scores.
- ``report`` / ``run``: summaries, paired differences, the markdown, JSON and PNG; one run.
"""
