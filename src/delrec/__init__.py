"""delrec: DELRec — distilling sequential patterns from conventional recommenders into LLM-based recommendation."""

__version__ = "0.1.0"
