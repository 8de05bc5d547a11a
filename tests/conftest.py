"""Shared test settings: never touch the network, keep torch to the cores we have."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DELREC_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
