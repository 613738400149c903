import os
import sys

# tools/tiny_llava.py (tiny LLaVA models made offline) is importable as `tiny_llava`.
sys.path.insert(0, os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

# A missed download must fail at once instead of retrying against a hub we cannot reach.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Triton decides interpreted-or-compiled when it is first imported (open_clip imports it through
# torch._dynamo), so the CPU interpreter must be switched on here, before any test module loads.
# TOKENPRUNE_TEST_DEVICE=cuda runs the kernel tests compiled on a GPU instead.
DEVICE = os.environ.get("TOKENPRUNE_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No download attempts, whatever imported huggingface_hub before HF_HUB_OFFLINE was set."""
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A registered tiny OpenCLIP architecture, its checkpoint and WebDatasets (tests/helpers.py),
    made once per test module."""
    from helpers import make_tiny
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def no_loading(monkeypatch):
    """Any OpenCLIP model load fails the test: checks that must come before loading use it."""
    import open_clip

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(open_clip, "create_model_and_transforms", refuse)
    monkeypatch.setattr(open_clip, "create_model", refuse)


@pytest.fixture
def no_command_run(no_loading, monkeypatch):
    """Reaching a command's run function (which imports and loads what it needs) fails the
    test, as does loading an OpenCLIP model: refusals that need only the flags and a model's
    config use it."""
    from tokenprune.cli import evaluate, generate, sweep, visualize

    def refuse(*args, **kwargs):
        raise AssertionError("the command ran past its checks")
    for module, name in ((evaluate, "run_eval"), (sweep, "run_sweep"),
                         (visualize, "run_visualize"), (generate, "run_generate")):
        monkeypatch.setattr(module, name, refuse)


@pytest.fixture(autouse=True)
def native_bfloat16_cpu(monkeypatch):
    """The --no_amp advice depends on the CPU's flags: every test sees a CPU with native
    bfloat16 (no advice) unless it sets the case itself, so that the expected output does not
    depend on the machine the tests run on (this project's machines differ in it)."""
    from tokenprune.cli import evaluate
    monkeypatch.setattr(evaluate, "cpu_has_native_bfloat16", lambda: True)
