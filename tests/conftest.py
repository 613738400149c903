import os

# A missed download must fail at once instead of retrying against a hub we cannot reach.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
