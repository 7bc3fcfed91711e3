"""Checkpoint tests never reach the network: force the Hugging Face hub offline before anything imports it."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
