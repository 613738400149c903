"""What `tokenprune eval` and `tokenprune sweep` check before any model loads (bad batch size,
output paths that cannot be written, results already there, WebDatasets with fewer shards than
workers or no class names), and the sweep's all-or-nothing write across filesystems.
Offline: the tiny OpenCLIP ViT and WebDataset of tests/helpers.py."""
import errno
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from tokenprune.cli import sweep as sweep_command  # noqa: E402

from helpers import CLASSES, TINY, class_images, run_main, write_webdataset  # noqa: E402


def data_args(tiny, data=None, workers="0"):
    return ["--dataset", "wds/tiny", "--dataset_root", data or tiny["data"], "--model", TINY,
            "--pretrained", tiny["checkpoint"], "--batch_size", "8", "--num_workers", workers]






def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenprune: error: "), err
    return lines[0]


def unwritable_folder():
    """A folder that even root cannot write in (sysfs), or None where there is none."""
    try:
        open("/sys/tokenprune-probe", "w").close()
    except OSError:
        return "/sys"
    os.remove("/sys/tokenprune-probe")
    return None


# ----- point 1: everything that can be checked, before any model loads -------------------

@pytest.mark.parametrize("command", ["eval", "sweep"])
@pytest.mark.parametrize("value", ["0", "-4"])
def test_batch_size_below_one_is_refused_first(tiny, tmp_path, capsys, no_loading, command,
                                               value):
    argv = [command, *data_args(tiny)]
    argv[argv.index("--batch_size") + 1] = value
    argv += (["--output", str(tmp_path / "out.json")] if command == "eval" else
             ["--output_dir", str(tmp_path / "out")])
    status, _, err = run_main(argv, capsys)
    assert status == 1
    assert one_error_line(err) == f"tokenprune: error: --batch_size must be an integer >= 1, " \
                                  f"got {value}"


def test_sweep_output_dir_naming_a_file_is_refused_first(tiny, tmp_path, capsys, no_loading):
    existing = tmp_path / "results"
    existing.write_text("not a folder")
    status, _, err = run_main(["sweep", *data_args(tiny), "--output_dir", str(existing)], capsys)
    assert status == 1
    line = one_error_line(err)
    assert f"--output_dir {existing}: " in line and "not a folder" in line


def test_eval_output_naming_a_folder_is_refused_first(tiny, tmp_path, capsys, no_loading):
    status, _, err = run_main(["eval", *data_args(tiny), "--output", str(tmp_path)], capsys)
    assert status == 1
    line = one_error_line(err)
    assert f"--output {tmp_path}: " in line and "a folder" in line
    assert os.path.join(str(tmp_path), "results.json") in line  # what to give instead


def test_eval_output_in_a_missing_folder_is_refused_first(tiny, tmp_path, capsys, no_loading):
    output = tmp_path / "missing" / "out.json"
    status, _, err = run_main(["eval", *data_args(tiny), "--output", str(output)], capsys)
    assert status == 1
    assert f"--output {output}: the folder {tmp_path / 'missing'} does not exist" in \
        one_error_line(err)


@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_output_where_nothing_can_be_written_is_refused_first(tiny, tmp_path, capsys,
                                                             no_loading, command):
    folder = unwritable_folder()
    if folder is None:
        pytest.skip("no folder here that cannot be written")
    target = os.path.join(folder, "tokenprune-out")
    flag = "--output" if command == "eval" else "--output_dir"
    status, _, err = run_main([command, *data_args(tiny), flag,
                               target + (".json" if command == "eval" else "")], capsys)
    assert status == 1
    line = one_error_line(err)
    assert f"{flag} {target}" in line and f"cannot write in {folder}" in line


# ----- point 2: results already there; a destination on another filesystem ---------------

def test_sweep_refuses_a_folder_that_holds_results(tiny, tmp_path, capsys, no_loading):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    status, _, err = run_main(["sweep", *data_args(tiny), "--output_dir", str(out)], capsys)
    assert status == 1
    line = one_error_line(err)
    assert f"--output_dir {out}: already holds sweep results (results.json)" in line
    assert "--overwrite" in line
    assert (out / "results.json").read_text() == "{}"


def test_sweep_writes_into_a_mount_point(tiny, tmp_path, capsys, monkeypatch):
    """--output_dir on another filesystem than its parent: a rename between the two fails with
    EXDEV, as os.rename, os.replace and shutil.move's rename do across filesystems. The
    results arrive all the same; --overwrite replaces the old ones."""
    out = tmp_path / "mounted"
    out.mkdir()
    (out / "results.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    mount = str(out) + os.sep

    def on_mount(path):
        return os.path.abspath(path).startswith(mount)

    def guarded(rename):
        def rename_on_one_filesystem(src, dst, *args, **kwargs):
            if on_mount(src) != on_mount(dst):
                raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
            return rename(src, dst, *args, **kwargs)
        return rename_on_one_filesystem

    for name in ("rename", "replace"):
        monkeypatch.setattr(os, name, guarded(getattr(os, name)))
    status, _, err = run_main(["sweep", *data_args(tiny), "--k_anchors", "4", "--top_m", "12",
                               "--alpha", "0.5", "--controls", "none", "--no_speed", "--quiet",
                               "--overwrite", "--output_dir", str(out)], capsys)
    assert status == 0, err
    assert sorted(os.listdir(out)) == sorted(sweep_command.OUTPUT_FILES + ("notes.txt",))
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 2
    assert sorted(os.listdir(tmp_path)) == ["mounted"]  # no staging folder left anywhere


def test_sweep_into_a_new_folder_leaves_nothing_when_writing_fails(tiny, tmp_path, capsys,
                                                                   monkeypatch):
    out = tmp_path / "new"

    def failing_plot(meta, result, path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(sweep_command, "plot", failing_plot)
    status, _, err = run_main(["sweep", *data_args(tiny), "--k_anchors", "4", "--top_m", "12",
                               "--alpha", "0.5", "--controls", "none", "--no_speed", "--quiet",
                               "--output_dir", str(out)], capsys)
    assert status == 1 and "No space left on device" in err
    assert os.listdir(tmp_path) == []


# ----- point 3: WebDatasets: fewer shards than workers, no classnames.txt ----------------

@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_webdataset_with_fewer_shards_than_workers_runs(tiny, tmp_path, capsys, command):
    """CLIP_benchmark's default is 4 workers; a one-shard WebDataset then fails in worker 1.
    tokenprune uses as many workers as there are shards, and says so in one line."""
    argv = [command, *data_args(tiny, workers="4"), "--quiet"]
    if command == "eval":
        argv += ["--output", str(tmp_path / "out.json")]
    else:
        argv += ["--k_anchors", "4", "--top_m", "12", "--alpha", "0.5", "--controls", "none",
                 "--no_speed", "--output_dir", str(tmp_path / "out")]
    status, _, err = run_main(argv, capsys)
    assert status == 0, err
    notes = [line for line in err.splitlines() if "--num_workers" in line]
    assert notes == ["tokenprune: note: --num_workers 4: wds/tiny has 1 shard, so 1 worker "
                     "reads it (a worker needs a shard of its own)"]
    if command == "eval":
        assert json.loads((tmp_path / "out.json").read_text())["metrics"]["acc1"] is not None


@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_webdataset_without_classnames_is_refused_first(tmp_path, tiny, capsys, no_loading,
                                                        command):
    data = write_webdataset(tmp_path / "wds", *class_images(4), CLASSES)
    os.remove(os.path.join(data, "classnames.txt"))
    argv = [command, *data_args(tiny, data)]
    argv += (["--output", str(tmp_path / "out.json")] if command == "eval" else
             ["--output_dir", str(tmp_path / "out")])
    status, _, err = run_main(argv, capsys)
    assert status == 1
    line = one_error_line(err)
    assert f"--dataset wds/tiny: no classnames.txt in {data}" in line
    assert "--custom_classname_file" in line


# ----- issue 20, findings 1 and 2: visualize --out, dataset names and roots, before loading --

@pytest.fixture
def no_shipped_model(monkeypatch):
    """The shipped ViT's loading fails the test (visualize's demo uses it)."""
    import tokenprune.proxy

    def refuse(*args, **kwargs):
        raise AssertionError("the shipped model was loaded")
    monkeypatch.setattr(tokenprune.proxy, "demo_inputs", refuse)


@pytest.mark.parametrize("out, message", [
    ("FOLDER", "--out FOLDER: a folder; give a file name, e.g. --out FOLDER/kept.png"),
    ("FOLDER/kept", "--out FOLDER/kept: not an image file name Pillow can write (give one "
                    "ending in .png, e.g. kept.png)"),
])
def test_visualize_out_is_checked_before_loading(tmp_path, capsys, no_loading, no_shipped_model,
                                                 out, message):
    out = out.replace("FOLDER", str(tmp_path))
    status, _, err = run_main(["visualize", "--out", out], capsys)
    assert status == 1
    assert one_error_line(err) == "tokenprune: error: " + message.replace("FOLDER", str(tmp_path))


def test_visualize_out_where_nothing_can_be_written_is_refused_first(capsys, no_loading,
                                                                     no_shipped_model):
    folder = unwritable_folder()
    if folder is None:
        pytest.skip("no folder here that cannot be written")
    out = os.path.join(folder, "kept.png")
    status, _, err = run_main(["visualize", "--out", out], capsys)
    assert status == 1
    assert f"--out {out}: cannot write in {folder}" in one_error_line(err)


def command_args(command, tmp_path):
    return (["--output", str(tmp_path / "out.json")] if command == "eval" else
            ["--output_dir", str(tmp_path / "out")])


@pytest.mark.parametrize("command", ["eval", "sweep"])
@pytest.mark.parametrize("dataset, closest", [("cifra10", "cifar10"),
                                              ("imagenet1", "imagenet1k"),
                                              ("vtab/cifar1000", "vtab/cifar100"),
                                              ("tokenprune:digit", "tokenprune:digits")])
def test_misspelt_dataset_is_refused_first_with_the_closest_names(tiny, tmp_path, capsys,
                                                                  no_loading, command, dataset,
                                                                  closest):
    argv = [command, *data_args(tiny), *command_args(command, tmp_path)]
    argv[argv.index("wds/tiny")] = dataset
    status, _, err = run_main(argv, capsys)
    assert status == 1
    line = one_error_line(err)
    assert line.startswith(f"tokenprune: error: unknown dataset {dataset!r}: ")
    assert f"Did you mean {closest}" in line


def test_clip_benchmark_dataset_names_are_read_from_its_builder():
    from clip_benchmark.datasets.builder import dataset_collection
    from tokenprune.cli.dataset_names import clip_benchmark_datasets
    known = clip_benchmark_datasets()
    assert {"cifar10", "imagenet1k", "mscoco_captions", "dummy"} <= known.names
    assert not {"train", "test", "en"} & known.names  # other strings of build_dataset
    assert {"wds/", "tfds/", "vtab/", "sugar_crepe"} <= set(known.prefixes)
    assert {"cifar100", "svhn"} <= known.vtab_names
    assert known.collections == set(dataset_collection)
    from tokenprune.cli.dataset_names import _dataset_known
    assert all(_dataset_known(name, known)  # every dataset of every collection is accepted
               for names in dataset_collection.values() for name in names)


@pytest.mark.parametrize("command", ["eval", "sweep"])
@pytest.mark.parametrize("root", [None, "missing", "empty"])
def test_webdataset_without_its_folder_is_refused_first(tiny, tmp_path, capsys, no_loading,
                                                        monkeypatch, command, root):
    monkeypatch.chdir(tmp_path)  # where CLIP_benchmark's default root, ./root, is missing
    argv = [command, *data_args(tiny), *command_args(command, tmp_path)]
    i = argv.index("--dataset_root")
    if root is None:
        del argv[i:i + 2]
        where = "no --dataset_root given, so CLIP_benchmark's default, the folder 'root' here"
        missing = f"no folder {tmp_path / 'root'}"
    elif root == "missing":
        argv[i + 1] = str(tmp_path / "missing")
        where, missing = f"--dataset_root {argv[i + 1]}", f"no folder {tmp_path / 'missing'}"
    else:
        (tmp_path / "empty").mkdir()
        argv[i + 1] = str(tmp_path / "empty")
        where = f"--dataset_root {argv[i + 1]}"
        missing = f"no {os.path.join('test', 'nshards.txt')} in {tmp_path / 'empty'}"
    status, _, err = run_main(argv, capsys)
    assert status == 1
    assert one_error_line(err).startswith(f"tokenprune: error: --dataset wds/tiny: {missing} "
                                          f"({where}); give --dataset_root DIR")


# ----- issue 28, a new user's findings: the answer that can be known first comes first -------

def test_missing_checkpoint_is_named_not_the_default_output(tiny, tmp_path, capsys, monkeypatch,
                                                           no_command_run):
    """Without --output, the results file's default name holds --pretrained: a missing
    checkpoint used to be reported as a missing folder of that name."""
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "nonexistent.pt")
    argv = ["eval", *data_args(tiny)]
    argv[argv.index(tiny["checkpoint"])] = missing
    status, _, err = run_main(argv, capsys)
    assert status == 1
    assert one_error_line(err) == f"tokenprune: error: --pretrained {missing}: no such " \
                                  "checkpoint file (give a file that exists, or a pretrained " \
                                  "tag of the model, such as openai)"


@pytest.mark.parametrize("command", ["eval", "sweep", "visualize"])
@pytest.mark.parametrize("given", ["adir", "./adir", "ADIR"])
def test_pretrained_folder_is_said_to_be_a_folder(tiny, tmp_path, capsys, monkeypatch,
                                                  no_command_run, command, given):
    """A folder is no checkpoint file: said so, not "unknown pretrained tag"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    given = given.replace("ADIR", str(tmp_path / "adir"))
    if command == "visualize":
        argv = ["visualize", "--model", TINY, "--out", str(tmp_path / "kept.png")]
    else:
        argv = [command, *data_args(tiny), *command_args(command, tmp_path)]
        del argv[argv.index("--pretrained"):argv.index("--pretrained") + 2]
    status, _, err = run_main(argv + ["--pretrained", given], capsys)
    assert status == 1
    line = one_error_line(err)
    assert line.startswith(f"tokenprune: error: --pretrained {given}: a folder, not a "
                           "checkpoint file; give the weights file in it"), line
    assert f"--model local-dir:{given}" in line and "unknown pretrained tag" not in line


@pytest.fixture
def no_shipped_loading(monkeypatch):
    """The shipped models' and canvases' loading fails the test."""
    import tokenprune.proxy
    from tokenprune.cli import shipped

    def refuse(*args, **kwargs):
        raise AssertionError("a shipped model or dataset was loaded")
    for module, name in ((shipped, "load_shipped_model"), (shipped, "build_shipped_dataset"),
                         (tokenprune.proxy, "load_proxy_model"),
                         (tokenprune.proxy, "demo_inputs")):
        monkeypatch.setattr(module, name, refuse)


SHIPPED = ["--model", "tokenprune:proxy-vit", "--dataset", "tokenprune:digits"]


@pytest.mark.parametrize("command, flags, message", [
    # a one-stage schedule is a single cut inside PruneConfig: still named as --schedule's stage
    ("eval", ["--schedule", "9:4:12"],
     "--schedule stage 1 layer must be in [-4, 3] for this 4-block tower, got 9"),
    ("eval", ["--schedule", "1:4:20,4:2:6"],
     "--schedule stage 2 layer must be in [-4, 3] for this 4-block tower, got 4"),
    ("eval", ["--layer", "4"], "--layer must be in [-4, 3] for this 4-block tower, got 4"),
    ("sweep", ["--schedule", "9:4:12"], "--schedule 9:4:12: schedule stage 1 layer must be in "
                                        "[-4, 3] for this 4-block tower, got 9"),
    ("sweep", ["--layer", "-1", "40"], "--layer must be in [-4, 3] for tokenprune:proxy-vit's "
                                       "4-block image tower, got 40"),
    ("visualize", ["--schedule", "9:4:12"],
     "--schedule stage 1 layer must be in [-4, 3] for this 4-block tower, got 9"),
    ("visualize", ["--layer", "10"], "--layer must be in [-4, 3] for this 4-block tower, got 10"),
])
def test_blocks_outside_a_shipped_tower_are_refused_before_anything_loads(
        tmp_path, capsys, no_command_run, no_shipped_loading, command, flags, message):
    if command == "visualize":
        argv = ["visualize", *flags, "--out", str(tmp_path / "kept.png")]
    else:
        argv = [command, *SHIPPED, *command_args(command, tmp_path), *flags]
        argv += ["--enable_pruning"] if command == "eval" else []
    status, out, err = run_main(argv, capsys)
    assert status == 1 and out == ""
    assert one_error_line(err) == f"tokenprune: error: {message}"


@pytest.mark.parametrize("command, flags, message", [
    ("eval", ["--model", "ViT-B-16", "--enable_pruning", "--layer", "12"],
     "--layer must be in [-12, 11] for this 12-block tower, got 12"),
    ("eval", ["--model", "ViT-B-16", "--enable_pruning", "--schedule", "3:10:50,12:4:20"],
     "--schedule stage 2 layer must be in [-12, 11] for this 12-block tower, got 12"),
    ("eval", ["--model", "ViT-B-61"], "unknown model 'ViT-B-61': not an OpenCLIP architecture. "
                                      "Did you mean ViT-B-16"),
    ("eval", ["--model", "RN50", "--enable_pruning"],
     "--enable_pruning: RN50 has a ResNet image tower, which cannot be pruned"),
    ("sweep", ["--model", "ViT-B-16", "ViT-B-32"],
     "--model ViT-B-16 ViT-B-32: tokenprune sweep takes exactly one model per run"),
    ("sweep", ["--model", "ViT-B-16", "--layer", "40"],
     "--layer must be in [-12, 11] for ViT-B-16's 12-block image tower, got 40"),
    ("sweep", ["--model", "RN50"], "--model RN50: RN50 has a ResNet image tower, which cannot "
                                   "be pruned"),
    ("visualize", ["--model", "ViT-B-61"], "unknown model 'ViT-B-61': not an OpenCLIP "
                                           "architecture. Did you mean ViT-B-16"),
    ("visualize", ["--model", "RN50"], "--model RN50: RN50 has a ResNet image tower, which "
                                       "cannot be pruned"),
    ("visualize", ["--model", "ViT-B-16", "--schedule", "3:4:20,1:2:6"],
     "--schedule blocks must be strictly increasing, got stage 1 at block 3 and stage 2 at "
     "block 1"),
    ("visualize", ["--model", "ViT-B-16", "--schedule", "11:10:50,-1:4:20"],
     "--schedule blocks must be strictly increasing, got 11, -1, which are blocks 11, 11 of "
     "this 12-block tower"),
])
def test_openclip_names_are_checked_from_their_config_before_anything_loads(
        tiny, tmp_path, capsys, no_command_run, command, flags, message):
    """The architecture's config gives its depth and tower kind: no weights, no import of the
    command's modules, so the answer comes at once."""
    if command == "visualize":
        argv = ["visualize", "--out", str(tmp_path / "kept.png"), *flags]
    else:
        argv = [command, "--dataset", "wds/tiny", "--dataset_root", tiny["data"],
                "--pretrained", tiny["checkpoint"], *command_args(command, tmp_path), *flags]
    status, out, err = run_main(argv, capsys)
    assert status == 1 and out == ""
    assert message in one_error_line(err)


def test_openclip_configs_are_read_as_open_clip_reads_them(monkeypatch):
    """Without open_clip imported (a fresh command line), the config comes from its file."""
    import sys

    import open_clip
    from tokenprune.cli import model_checks
    assert set(model_checks.known_openclip_models()) == set(open_clip.list_models())
    expected = {name: open_clip.get_model_config(name) for name in ("ViT-B-16", "RN50",
                                                                   "EVA02-B-16")}
    monkeypatch.delitem(sys.modules, "open_clip")
    assert {name: model_checks.openclip_config(name) for name in expected} == expected
    assert model_checks.openclip_config("ViT-B-61") is None
    assert set(model_checks.known_openclip_models()) >= set(expected)
    assert model_checks.check_model_config("ViT-B-16") == 12
    assert model_checks.check_model_config("EVA02-B-16") is None  # a timm tower: known once built


def test_shipped_cards_are_the_regimes_cards():
    from tokenprune.cli import shipped_rules
    from tokenprune.proxy import REGIMES
    assert shipped_rules.SHIPPED_CARDS == {name: regime.card for name, regime in REGIMES.items()}


@pytest.fixture
def no_lmms_run(monkeypatch):
    """An lmms-eval run of lmms-sweep (the unpruned one comes first) fails the test."""
    import tokenprune.lmms.sweep

    def refuse(*args, **kwargs):
        raise AssertionError("lmms-eval ran")
    monkeypatch.setattr(tokenprune.lmms.sweep, "run_sweep", refuse)
    monkeypatch.setattr(tokenprune.lmms.sweep, "run_one", refuse)


@pytest.mark.parametrize("model, setting, message", [
    ("tokenprune_llava_hf", "layer=1",
     "--setting 'layer=1': layer is for the Qwen-VL models (tokenprune_qwen2_vl, "
     "tokenprune_qwen2_5_vl, tokenprune_qwen3_vl, tokenprune_qwen3_5); tokenprune_llava_hf "
     "prunes at the vision block whose output LLaVA uses: leave layer out"),
    ("tokenprune_gemma3", "layer=1",
     "--setting 'layer=1': layer is for the Qwen-VL models (tokenprune_qwen2_vl, "
     "tokenprune_qwen2_5_vl, tokenprune_qwen3_vl, tokenprune_qwen3_5); tokenprune_gemma3 "
     "prunes where its family's section of SPEC.md says: leave layer out"),
    ("tokenprune_qwen2_5_vl", "k_anchors=2,layer=0",
     "--setting 'k_anchors=2,layer=0': layer 0 is window-attention block 0 of Qwen2.5-VL's "
     "vision tower: layer must be one of its full-attention blocks [1, 3] (or [-3, -1])"),
    ("tokenprune_qwen2_5_vl", "layer=4",
     "--setting 'layer=4': layer must be a vision block index in [-4, 3] for QWEN's 4-block "
     "vision tower, got 4"),
])
def test_lmms_sweep_checks_every_setting_before_the_first_run(tmp_path, capsys, no_lmms_run,
                                                              model, setting, message):
    """A layer that the model refuses failed after the unpruned run (28 s with a tiny LLaVA),
    its reason only in lmms-eval's log: now one line, from the model id and its config."""
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({
        "model_type": "qwen2_5_vl", "vision_config": {"depth": 4,
                                                      "fullatt_block_indexes": [1, 3]}}))
    status, out, err = run_main(["lmms-sweep", "--model", model, "--model_args",
                                 f"pretrained={qwen}", "--tasks", "mme", "--setting", "ratio=0.5",
                                 "--setting", setting, "--out", str(tmp_path / "out")], capsys)
    assert status == 1 and out == ""
    assert one_error_line(err).startswith("tokenprune: error: " +
                                          message.replace("QWEN", str(qwen))), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_default_workers_fit_the_machine(tmp_path, capsys, monkeypatch, command):
    """On a 2-CPU machine CLIP_benchmark's default of 4 workers made torch's DataLoader warn
    ("4 worker processes ... suggested max 2") twice in every shipped-model run: without
    --num_workers, no more workers than CPUs, and no warning."""
    import functools
    import warnings

    import torch.utils.data
    from tokenprune.cli import shipped
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(shipped, "build_shipped_dataset",
                        functools.partial(shipped.build_shipped_dataset, count=64))
    workers = []
    init = torch.utils.data.DataLoader.__init__

    def recorded(self, *args, **kwargs):
        init(self, *args, **kwargs)
        workers.append(self.num_workers)
    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", recorded)
    argv = [command, *SHIPPED, "--no_amp", "--batch_size", "32", "--quiet",
            *command_args(command, tmp_path)]
    if command == "sweep":
        argv += ["--k_anchors", "4", "--top_m", "12", "--alpha", "0.5", "--controls", "none",
                 "--no_speed"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, _, err = run_main(argv, capsys)
    assert status == 0, err
    assert workers and set(workers) == {2}
    shown = [str(w.message) for w in caught if "worker" in str(w.message)]
    assert shown == [] and "worker processes" not in err, shown + [err]
