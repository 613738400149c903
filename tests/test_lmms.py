"""tokenprune's models in lmms-eval (tokenprune/lmms/), run through lmms-eval's own evaluator on
a tiny LLaVA and the five-question task of tools/lmms_task.py, offline. Skipped without lmms-eval
(`pip install -e ".[lmms]"`; CI installs it)."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval", reason='lmms-eval is not installed: pip install -e ".[lmms]"')

from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402
from lmms_task import write_task  # noqa: E402  (tests/conftest.py: tools/)
from tiny_gemma3 import save_gemma3  # noqa: E402
from tiny_internvl import save_internvl  # noqa: E402
from tiny_llava import save_llava  # noqa: E402
from tiny_llava_next import save_llava_next  # noqa: E402
from tiny_qwen_vl import save_qwen_vl  # noqa: E402

from helpers import run_main  # noqa: E402
from tokenprune.lmms import MODELS  # noqa: E402
from tokenprune.lmms.llava_hf import TokenpruneLlavaHf  # noqa: E402
from tokenprune.lmms.sweep import run_sweep  # noqa: E402

TASK = "tokenprune_test_colours"
DOCS = 5  # with --batch_size 2: batches of 2, 2 and 1
K, M = 2, 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(the tiny LLaVA's folder, a TaskManager that knows the test task)."""
    root = tmp_path_factory.mktemp("lmms")
    save_llava(str(root / "llava"))
    task_dir = root / "task"
    # The task that tools/lmms_task.py ships (docs/lmms-eval.md, "Trying it offline"), with
    # these questions: images of different sizes and colours; the questions differ in length,
    # so that a batch is left-padded.
    questions = ["what color is it ?", "what is the color of the picture ?", "what is this ?"]
    write_task(str(task_dir), TASK, [{
        "id": i, "size": [24 + 8 * i, 32],
        "rgb": [(60 * i) % 256, (100 * i + 30) % 256, (200 - 30 * i) % 256],
        "question": questions[i % len(questions)], "answer": "red"} for i in range(DOCS)])
    return root / "llava", TaskManager("WARNING", include_path=str(task_dir)), task_dir


def evaluate(setup, model, model_args="", batch_size=1, base_args=None):
    """lmms-eval's results, the answers in doc order and the samples; base_args default to the
    tiny LLaVA's."""
    folder, tasks, _ = setup
    args = base_args or f"pretrained={folder},dtype=float32"
    args += f",{model_args}" if model_args else ""
    results = simple_evaluate(model=model, model_args=args, tasks=[TASK], batch_size=batch_size,
                              device="cpu", log_samples=True, task_manager=tasks,
                              verbosity="WARNING")
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return results, [s["filtered_resps"] for s in samples], samples


def test_the_entry_point_registers_every_model():
    for model_id in MODELS:
        assert get_model(model_id).__module__.startswith("tokenprune.lmms.")
        assert get_model(model_id).MODEL_ID == model_id
    assert get_model("tokenprune_llava_hf") is TokenpruneLlavaHf
    assert set(MODELS) == {"tokenprune_llava_hf", "tokenprune_qwen2_vl", "tokenprune_qwen2_5_vl",
                           "tokenprune_qwen3_vl", "tokenprune_qwen3_5", "tokenprune_gemma3",
                           "tokenprune_internvl_hf"}


@pytest.mark.parametrize("model_args, named", [
    ("k_anchors=-1", "k_anchors"),       # lmms-eval hands it over as the float -1.0
    ("k_anchors=2.5", "k_anchors"),      # never rounded
    ("top_m=abc", "top_m"),
    ("selection=bogus", "selection"),
    ("ratio=0", "ratio"),
    ("ratio=1.5", "ratio"),
    ("ratio=0.5,top_m=3", "ratio"),     # two counts
    ("alpha=2", "alpha"),
    ("layer=1.5", "layer"),
    ("ratoi=0.5", "unknown model argument 'ratoi' (did you mean ratio?)"),  # a misspelt name
])
def test_bad_pruning_arguments_are_refused_before_loading(model_args, named):
    # The folder does not exist: a refusal that came after loading would be another error.
    with pytest.raises(SystemExit) as refusal:
        get_model("tokenprune_llava_hf").create_from_arg_string(
            f"pretrained=/nonexistent/llava,device=cpu,{model_args}")
    message = str(refusal.value.code)
    assert message.startswith("tokenprune_llava_hf: ") and named in message
    assert "\n" not in message


def test_the_command_line_refusal_is_one_line_and_fails(tmp_path):
    # lmms-eval's command line catches every Exception and exits 0: the refusal must not.
    done = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "tokenprune_llava_hf",
                           "--model_args", "pretrained=/nonexistent,selection=bogus",
                           "--tasks", "mme"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("tokenprune_llava_hf: selection")
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def base_run(setup):
    return evaluate(setup, "llava_hf", "device_map=cpu")


@pytest.fixture(scope="module")
def unpruned_run(setup):
    return evaluate(setup, "tokenprune_llava_hf")


def test_without_pruning_arguments_the_answers_are_the_base_models(unpruned_run, base_run):
    results, answers, _ = unpruned_run
    assert answers == base_run[1]
    assert results["results"][TASK] == base_run[0]["results"][TASK]
    assert results["throughput"]["avg_tokenprune_image_tokens_per_image"] == 16  # all patches


@pytest.fixture(scope="module")
def pruned_runs(setup, tmp_path_factory):
    record = tmp_path_factory.mktemp("record") / "record.json"
    args = f"k_anchors={K},top_m={M},selection=cls,tokenprune_record={record}"
    return (evaluate(setup, "tokenprune_llava_hf", args, batch_size=1),
            evaluate(setup, "tokenprune_llava_hf", args, batch_size=2),
            json.loads(record.read_text()))


def test_batches_give_the_answers_of_one_prompt_at_a_time(pruned_runs, base_run):
    (_, single, single_samples), (_, batched, batched_samples), _ = pruned_runs
    assert batched == single
    assert ([s["token_counts"] for s in batched_samples]
            == [s["token_counts"] for s in single_samples])
    assert single != base_run[1]  # the pruning changes the answers of this random model


def test_the_results_record_the_pruning_and_the_image_tokens(pruned_runs, unpruned_run):
    (results, _, samples), _, record = pruned_runs
    throughput = results["throughput"]
    assert throughput["avg_tokenprune_image_tokens_per_image"] == K + M
    assert throughput["avg_tokenprune_k_anchors"] == K
    assert throughput["avg_tokenprune_top_m"] == M
    assert throughput["avg_tokenprune_time_to_first_token_s"] > 0
    # The language model's input is 16 - (K + M) tokens shorter per image than unpruned.
    base_inputs = [s["token_counts"][0]["input_tokens"] for s in unpruned_run[2]]
    assert [s["token_counts"][0]["input_tokens"] for s in samples] == [
        n - (16 - K - M) for n in base_inputs]
    # The record of the last run (batch size 2) holds everything, the selection included.
    assert record["selection"] == "cls" and record["pruned"] is True
    assert (record["k_anchors"], record["top_m"], record["batch_size"]) == (K, M, 2)
    assert record["image_tokens_per_image"] == K + M


def test_lmms_sweep_table_resume_and_a_failed_run(setup, tmp_path):
    folder, _, task_dir = setup
    said = []
    sweep = dict(model_id="tokenprune_llava_hf", model_args=f"pretrained={folder},device=cpu",
                 tasks=TASK, out_dir=str(tmp_path), batch_size=2,
                 extra_args=["--include_path", str(task_dir)], say=said.append)
    rows = run_sweep(settings=[{"k_anchors": K, "top_m": M}], **sweep)
    assert [r["setting"] for r in rows] == ["unpruned", f"k_anchors-{K}_top_m-{M}"]
    assert [r["image_tokens_per_image"] for r in rows] == [16, K + M]
    assert all(f"{TASK}/exact" in r and r["peak_memory_mib"] > 0 for r in rows)
    summary = (tmp_path / "summary.md").read_text()
    assert f"| k_anchors-{K}_top_m-{M} | 5 |" in summary and "stderr" not in summary
    assert (tmp_path / "score_vs_image_tokens.png").stat().st_size > 0
    # Run again with one more setting: the two done runs are not run again.
    said.clear()
    more = run_sweep(settings=[{"k_anchors": K, "top_m": M}, {"ratio": 0.5}], **sweep)
    assert said[0].endswith("unpruned: done earlier, not run again")
    assert said[1].endswith(f"k_anchors-{K}_top_m-{M}: done earlier, not run again")
    assert [line for line in said if "running lmms-eval" in line] == [
        "[3/3] ratio-0.5: running lmms-eval ..."]
    assert more[:2] == rows and more[2]["image_tokens_per_image"] == 8
    # lmms-eval exits 0 when a run fails; the sweep must not take that for a result.
    with pytest.raises(RuntimeError, match="failed"):
        run_sweep(settings=[{"k_anchors": 1, "top_m": 1}],
                  **{**sweep, "tasks": "tokenprune_no_such_task"})


@pytest.mark.parametrize("argv, says", [
    (["--model", "llava_hf"], "--model llava_hf: not one of"),
    (["--model_args", "pretrained=x,ratio=0.5"], "--model_args holds pruning arguments (ratio)"),
    (["--setting", "ratio=2"], "ratio must be a number in (0, 1]"),
    (["--setting", "k_anchors=3,bogus=1"], "'bogus=1' is not NAME=VALUE"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
])
def test_lmms_sweep_bad_input_is_one_line(argv, says, capsys, tmp_path):
    base = {"--model_args": "pretrained=x", "--tasks": "mme", "--setting": "ratio=0.5",
            "--out": str(tmp_path / "out")}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    status, _, err = run_main(["lmms-sweep", *[a for kv in base.items() for a in kv]], capsys)
    assert status == 1 and says in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe",
                                    "qwen3_5", "qwen3_5_moe"])
def test_qwen_models_prune_lmms_evals_own(family, setup, tmp_path):
    """The base batches already: the answers without pruning are the base's, pruned ones are
    the same at batch 1 and 2 (left padding), and the results count 2 image tokens per image.
    The base is lmms-eval's model for the family (FAMILIES' lmms_model): its qwen3_vl and qwen3_5
    load the MoE class when the pretrained name holds an active size such as "A1B"."""
    from tokenprune.vlm import FAMILIES
    base_model = FAMILIES[family].lmms_model
    folder = save_qwen_vl(str(tmp_path / (f"{family}-A1B" if "moe" in family else family)),
                          family)
    # Small images (the tiny model's 8-px patches), and the CPU: the base's "auto" needs CUDA.
    base_args = f"pretrained={folder},min_pixels=256,max_pixels=4096"
    if base_model == "qwen3_5":  # else it keeps only what follows </think>: nothing here
        base_args += ",enable_thinking=False"
    _, base, _ = evaluate(setup, base_model, base_args=base_args + ",device_map=cpu")
    unpruned, ours, _ = evaluate(setup, f"tokenprune_{base_model}", base_args=base_args)
    assert ours == base and any(answer != [""] for answer in base)  # answers to compare
    assert unpruned["throughput"]["avg_tokenprune_image_tokens_per_image"] > 2
    # The second setting prunes inside the tower (layer=-1: the tiny towers' last block).
    for setting in ("k_anchors=1,top_m=1", "k_anchors=1,top_m=1,layer=-1"):
        pruned, single, _ = evaluate(setup, f"tokenprune_{base_model}", setting,
                                     base_args=base_args)
        _, batched, _ = evaluate(setup, f"tokenprune_{base_model}", setting, batch_size=2,
                                 base_args=base_args)
        assert batched == single, setting
        # What shows that it pruned: this random model's answers may not change.
        assert pruned["throughput"]["avg_tokenprune_image_tokens_per_image"] == 2, setting


def test_gemma3_prunes_lmms_evals_own(setup, tmp_path):
    """lmms-eval's gemma3 (its simple implementation) batches already, left-padded to a multiple
    of 8: the answers without pruning are the base's, pruned ones are the same at batch 1 and 2,
    and the results count 2 of the tiny model's 16 image tokens per image."""
    folder = save_gemma3(str(tmp_path / "gemma3"))
    base_args = f"pretrained={folder}"  # the CPU: the base's "auto" needs CUDA
    _, base, _ = evaluate(setup, "gemma3", base_args=base_args + ",device_map=cpu")
    unpruned, ours, _ = evaluate(setup, "tokenprune_gemma3", base_args=base_args)
    assert ours == base
    assert unpruned["throughput"]["avg_tokenprune_image_tokens_per_image"] == 16
    pruned, single, _ = evaluate(setup, "tokenprune_gemma3", "k_anchors=1,top_m=1",
                                 base_args=base_args)
    _, batched, _ = evaluate(setup, "tokenprune_gemma3", "k_anchors=1,top_m=1", batch_size=2,
                             base_args=base_args)
    assert batched == single
    # What shows that it pruned: this random model's answers may not change.
    assert pruned["throughput"]["avg_tokenprune_image_tokens_per_image"] == 2


def test_internvl_prunes_lmms_evals_own(setup, tmp_path):
    """lmms-eval's internvl_hf runs one prompt per generate (it asserts batch_size 1), and so
    does ours: the answers without pruning are the base's, and pruned ones count 2 image tokens
    per image (not per tile: its pixel_values hold tiles)."""
    folder = save_internvl(str(tmp_path / "internvl"))
    base_args = f"pretrained={folder},max_patches=4"  # the tiny model's 32-px tiles, 1 to 4
    _, base, _ = evaluate(setup, "internvl_hf", base_args=base_args + ",device_map=cpu")
    unpruned, ours, _ = evaluate(setup, "tokenprune_internvl_hf", base_args=base_args)
    assert ours == base and all(answer != [""] for answer in ours)  # the base's "" is a failure
    # 16 per tile; images of 1 to 4 tiles and a thumbnail.
    assert unpruned["throughput"]["avg_tokenprune_image_tokens_per_image"] >= 16
    pruned, answers, _ = evaluate(setup, "tokenprune_internvl_hf", "k_anchors=1,top_m=1",
                                  base_args=base_args)
    assert all(answer != [""] for answer in answers)
    assert pruned["throughput"]["avg_tokenprune_image_tokens_per_image"] == 2


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_llava_next_and_onevision_prune_through_llava_hf(family, setup, tmp_path):
    """lmms-eval's llava_hf loads transformers' LLaVA-NeXT and LLaVA-OneVision too, so
    tokenprune_llava_hf prunes them: the answers without pruning are the base's, pruned ones are
    the same at batch 1 and 2 (left padding, images of different sizes and tile counts), and the
    results count the pruned placeholders (fewer per image than unpruned)."""
    folder = save_llava_next(str(tmp_path / family), family)
    base_args = f"pretrained={folder},dtype=float32"
    _, base, _ = evaluate(setup, "llava_hf", "device_map=cpu", base_args=base_args)
    unpruned, ours, _ = evaluate(setup, "tokenprune_llava_hf", base_args=base_args)
    assert ours == base
    pruned, single, _ = evaluate(setup, "tokenprune_llava_hf", "ratio=0.25",
                                 base_args=base_args)
    _, batched, _ = evaluate(setup, "tokenprune_llava_hf", "ratio=0.25", batch_size=2,
                             base_args=base_args)
    assert batched == single
    before, after = (run["throughput"]["avg_tokenprune_image_tokens_per_image"]
                     for run in (unpruned, pruned))
    assert after < before / 2, (before, after)
