"""What tokenprune's lmms-eval models check, and the offline task they ship, without lmms-eval:
tokenprune/lmms/__init__.py imports nothing of it (tests/test_lmms.py runs the same through
lmms-eval itself, where it is installed)."""
import pytest

from tokenprune.lmms import (PRUNING_ARGUMENTS, PruningArgumentError, declared_arguments,
                             split_pruning_arguments)


class LmmsModel:
    """Stands in for lmms-eval's base class `lmms`."""

    def __init__(self):
        pass


class SimpleLlavaHf(LmmsModel):
    """The signature of lmms-eval 0.7.3's simple llava_hf: named arguments, then **kwargs that it
    asserts to be empty."""

    def __init__(self, pretrained="llava-hf/llava-1.5-7b-hf", revision="main", device="cuda",
                 dtype="auto", batch_size=1, trust_remote_code=False, attn_implementation=None,
                 device_map="", chat_template=None, use_cache=True, max_frames_num=32, **kwargs):
        assert kwargs == {}, f"Unexpected kwargs: {kwargs}"


class ChatLlavaHf(SimpleLlavaHf):
    """lmms-eval's chat llava_hf: the simple one's __init__, inherited."""


LLAVA_HF = ("pretrained", "revision", "device", "dtype", "batch_size", "trust_remote_code",
            "attn_implementation", "device_map", "chat_template", "use_cache", "max_frames_num")


def test_the_base_arguments_are_the_named_parameters_of_its_init():
    assert declared_arguments(ChatLlavaHf) == LLAVA_HF
    assert declared_arguments(LmmsModel) == ()


def test_a_misspelt_model_argument_is_refused_in_one_line_naming_the_allowed_ones():
    """ratoi=0.5 went to the base, whose assert printed a traceback, and lmms-eval's command
    line exited 0 (issue 28). Now: one line, exit status 1 (a SystemExit), before loading."""
    arguments = {"pretrained": "/nonexistent", "device": "cpu", "ratoi": 0.5}
    with pytest.raises(PruningArgumentError) as refusal:
        split_pruning_arguments("tokenprune_llava_hf", arguments, declared_arguments(ChatLlavaHf),
                                ours=("tokenprune_record",))
    message = refusal.value.code
    assert isinstance(refusal.value, SystemExit) and "\n" not in message
    assert message.startswith("tokenprune_llava_hf: unknown model argument 'ratoi' (did you mean "
                              "ratio?); the pruning arguments are k_anchors, top_m, ratio, ")
    for allowed in (*PRUNING_ARGUMENTS, *LLAVA_HF, "tokenprune_record"):
        assert allowed in message
    assert "lmms-eval's llava_hf's pretrained, revision, device" in message


def test_the_base_and_our_own_arguments_pass():
    arguments = {"pretrained": "x", "device_map": "cpu", "ratio": 0.5, "k_anchors": 3.0}
    pruning, base = split_pruning_arguments("tokenprune_llava_hf", arguments, LLAVA_HF,
                                            ours=("tokenprune_record",))
    assert pruning == {"ratio": 0.5, "k_anchors": 3}
    assert base == {"pretrained": "x", "device_map": "cpu"}
    # Without the base's names (lmms-sweep's settings): every other name goes to the base.
    assert split_pruning_arguments("tokenprune_llava_hf", {"ratoi": 0.5}) == ({}, {"ratoi": 0.5})
