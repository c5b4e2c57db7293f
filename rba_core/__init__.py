"""rba: Reinforced Behavior Alignment for speech LLMs."""

__version__ = "0.1.0"
