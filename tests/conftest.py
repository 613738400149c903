import os

# A missed download must fail at once instead of retrying against a hub we cannot reach.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Triton decides interpreted-or-compiled when it is first imported (open_clip imports it through
# torch._dynamo), so the CPU interpreter must be switched on here, before any test module loads.
# TOKENPRUNE_TEST_DEVICE=cuda runs the kernel tests compiled on a GPU instead.
DEVICE = os.environ.get("TOKENPRUNE_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
