"""What tokenprune's lmms-eval models check, and the offline task that tools/lmms_task.py
writes, without lmms-eval: tokenprune/lmms/__init__.py imports nothing of it (tests/test_lmms.py
runs the same through lmms-eval itself, where it is installed)."""
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


class SimpleQwen3VL(LmmsModel):
    """lmms-eval 0.7.3's simple qwen3_vl (its arguments shortened): named arguments, then
    **kwargs that it asserts to be empty."""

    def __init__(self, pretrained="Qwen/Qwen3-VL-4B-Instruct", device="cuda", batch_size=1,
                 min_pixels=200704, enable_thinking=None, **kwargs):
        assert kwargs == {}, f"Unexpected kwargs: {kwargs}"


class SimpleQwen3_5(SimpleQwen3VL):
    """Its simple qwen3_5: other defaults for some, the rest handed on to qwen3_vl's."""

    def __init__(self, pretrained="Qwen/Qwen3.5-4B", min_pixels=65536, max_frames=None,
                 enable_thinking=True, **kwargs):
        super().__init__(pretrained=pretrained, min_pixels=min_pixels,
                         enable_thinking=enable_thinking, **kwargs)


class ChatQwen3VL(SimpleQwen3VL):
    """Its chat qwen3_vl: the simple one's __init__, inherited."""


class ChatQwen3_5(ChatQwen3VL, SimpleQwen3_5):
    """Its chat qwen3_5: the chat qwen3_vl and the simple qwen3_5, no __init__ of its own."""


def test_the_base_arguments_are_the_named_parameters_of_its_init():
    assert declared_arguments(ChatLlavaHf) == LLAVA_HF
    assert declared_arguments(LmmsModel) == ()
    # An __init__ that hands **kwargs on: its parent's named parameters count too.
    assert declared_arguments(ChatQwen3_5) == ("pretrained", "min_pixels", "max_frames",
                                               "enable_thinking", "device", "batch_size")
    assert declared_arguments(ChatQwen3VL) == ("pretrained", "device", "batch_size",
                                               "min_pixels", "enable_thinking")


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


def test_the_shipped_offline_task_is_a_valid_lmms_eval_task(tmp_path, capsys):
    """tools/lmms_task.py writes what lmms-eval reads (docs/lmms-eval.md, "Trying it offline"):
    the YAML's keys, the data file it names, five questions, and the functions the YAML names,
    checked here from the lmms-eval task format without lmms-eval (tests/test_lmms.py runs the
    same writer through lmms-eval)."""
    import importlib.util
    import json

    yaml = pytest.importorskip("yaml")
    from lmms_task import main  # tests/conftest.py puts tools/ on sys.path

    folder = tmp_path / "task"
    assert main([str(folder)]) == 0
    said = capsys.readouterr().out
    assert "--tasks tokenprune_colours" in said and f"--include_path {folder}" in said

    class TaskLoader(yaml.SafeLoader):
        """lmms-eval's task YAML: `!function module.name` names a function of a module beside it."""

    TaskLoader.add_constructor("!function", lambda loader, node: ("function", node.value))
    task = yaml.load((folder / "colours.yaml").read_text(), Loader=TaskLoader)
    assert (task["task"], task["dataset_path"], task["test_split"], task["output_type"]) == (
        "tokenprune_colours", "json", "test", "generate_until")
    assert task["doc_to_target"] == "answer"
    assert [m["metric"] for m in task["metric_list"]] == ["exact"]
    data = task["dataset_kwargs"]["data_files"]["test"]
    assert data == str(folder / "colours.jsonl")  # absolute: lmms-eval may run elsewhere
    docs = [json.loads(line) for line in open(data, encoding="utf-8")]
    assert len(docs) == 5 and len({d["answer"] for d in docs}) == 5
    assert len({tuple(d["size"]) for d in docs}) == 5  # Qwen-VL grids of different sizes

    spec = importlib.util.spec_from_file_location("colours_utils", folder / "colours_utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    for key in ("doc_to_visual", "doc_to_text", "process_results"):
        kind, name = task[key]
        module, _, function = name.partition(".")
        assert kind == "function" and module == "colours_utils" and hasattr(utils, function)
    for doc in docs:
        (picture,) = utils.doc_to_visual(doc)
        assert picture.mode == "RGB" and list(picture.size) == doc["size"]
        assert picture.getpixel((0, 0)) == tuple(doc["rgb"])
        assert utils.doc_to_text(doc) == doc["question"]
        assert utils.process_results(doc, [f" {doc['answer'].title()}\n"]) == {"exact": 1.0}
        assert utils.process_results(doc, ["no"]) == {"exact": 0.0}
