"""Scoring of a SpeechLM's answers, shared by evaluation and the RL step's held-out checks."""
