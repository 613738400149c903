"""The checks that several commands make before anything loads, from the flags and the files
alone: eval's and sweep's batch size and workers (CLIP_benchmark's DataLoader would refuse them
only after the model loaded), the folders results go to, a local WebDataset's folder; and, once
torch is imported, the machine: --device, native bfloat16. A command's own checks are in its
module (tokenprune/cli/commands/); a model's in model_checks.py, the datasets' names in
dataset_names.py, the shipped models' in shipped_rules.py."""
import os
import tempfile

from .clip_benchmark_flags import DEFAULT_DATASET_ROOT
from .common import CLIError, note


def as_list(value):
    """A flag's values as a list: CLIP_benchmark's --model, --dataset ... take one or several."""
    return value if isinstance(value, list) else [value]


def one_value(args, name):
    """The one value sweep takes for `name` (model, pretrained, dataset, language)."""
    values = as_list(getattr(args, name))
    if len(values) != 1:
        raise CLIError(f"--{name} {' '.join(map(str, values))}: tokenprune sweep takes exactly "
                       f"one {name} per run")
    return values[0]


def flag_given(argv, flag):
    """Whether a command line sets `flag` itself (spelt in full: argparse takes no shorter
    spelling where another flag shares it, as --pretrained_model does --pretrained's)."""
    return any(arg.partition("=")[0] == flag for arg in argv)


def check_run_flags(args):
    """eval's and sweep's flags that need nothing loaded: the batch size and the number of
    workers (CLIP_benchmark's DataLoader would fail on them only after the model loaded)."""
    if args.batch_size < 1:
        raise CLIError(f"--batch_size must be an integer >= 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise CLIError(f"--num_workers must be an integer >= 0, got {args.num_workers}")


def _can_write_in(folder):
    """Whether a file can be made in `folder`: tried, since os.access says yes to root even on
    a read-only filesystem."""
    try:
        handle, probe = tempfile.mkstemp(prefix=".tokenprune-probe-", dir=folder)
    except OSError:
        return False
    os.close(handle)
    os.remove(probe)
    return True


def check_writable(flag, given, folder, create=False):
    """`folder` (or, with `create`, the nearest folder above it that exists) is a folder that
    can be written in; else a CLIError naming `flag` and the value `given`."""
    existing = os.path.abspath(folder)
    if not create and not os.path.exists(existing):
        raise CLIError(f"{flag} {given}: the folder {folder} does not exist; make it first")
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CLIError(f"{flag} {given}: {existing} is a file, not a folder")
    if not _can_write_in(existing):
        raise CLIError(f"{flag} {given}: cannot write in {existing} (no permission, or a "
                       "read-only filesystem)")


def webdataset_workers(args):
    """eval's and sweep's checks of a local WebDataset (`--dataset wds/NAME`), made before the
    model loads: its class names must be there for zero-shot classification, and no more
    workers are used than it has shards (a worker without a shard fails in webdataset).
    Returns the --num_workers to use; a note says when that is fewer than asked."""
    workers = args.num_workers
    for dataset in as_list(args.dataset):
        if not dataset.startswith("wds/") or "://" in args.dataset_root:
            continue
        name = dataset.replace("wds/", "", 1)
        root = args.dataset_root.format(dataset=name, dataset_cleaned=name.replace("/", "-"))
        shards = _webdataset_shards(dataset, root, args)
        try:
            with open(os.path.join(root, "dataset_type.txt"), encoding="utf-8") as f:
                kind = f.read().strip().lower()
        except OSError:
            kind = "classification"
        if (kind != "retrieval" and args.task in ("auto", "zeroshot_classification")
                and not args.custom_classname_file
                and not os.path.isfile(os.path.join(root, "classnames.txt"))):
            raise CLIError(f"--dataset {dataset}: no classnames.txt in {root} (one class name a "
                           "line, in label order), which zero-shot classification needs; add "
                           "it, or pass --custom_classname_file")
        if 0 < shards < workers:
            note(f"note: --num_workers {args.num_workers}: {dataset} has {shards} "
                 f"shard{'s' if shards > 1 else ''}, so {shards} worker{'s' if shards > 1 else ''} "
                 f"read{'' if shards > 1 else 's'} it (a worker needs a shard of its own)")
            workers = shards
    return workers


def _webdataset_shards(dataset, root, args):
    """The shard count in a local WebDataset's SPLIT/nshards.txt, which CLIP_benchmark reads
    first; a CLIError, naming --dataset_root (or its absence), where there is none."""
    where = (f"--dataset_root {args.dataset_root}" if args.dataset_root != DEFAULT_DATASET_ROOT
             else f"no --dataset_root given, so CLIP_benchmark's default, the folder "
                  f"{DEFAULT_DATASET_ROOT!r} here")
    found = os.path.join(root, args.split, "nshards.txt")
    try:
        with open(found, encoding="utf-8") as f:
            return int(f.read())
    except OSError:
        missing = (f"no folder {os.path.abspath(root)}" if not os.path.isdir(root) else
                   f"no {os.path.join(args.split, 'nshards.txt')} in {root}")
    except ValueError:
        missing = f"{found} does not hold a number of shards"
    raise CLIError(f"--dataset {dataset}: {missing} ({where}); give --dataset_root DIR, the "
                   f"WebDataset's folder, which holds {args.split}/nshards.txt, the shards "
                   f"{args.split}/0.tar ... and classnames.txt")


def usable_cpus():
    """The CPUs this process may run on, as torch's DataLoader counts them when it warns about
    too many workers (the affinity mask where there is one, else os.cpu_count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers(args, argv):
    """eval's and sweep's --num_workers: as given, else CLIP_benchmark's default (4) but no more
    than the CPUs here; more would make torch's DataLoader warn (twice a run) and gain nothing."""
    if flag_given(argv, "--num_workers"):
        return args.num_workers
    return min(args.num_workers, usable_cpus())


# ----- the machine, once torch is imported ---------------------------------------------------

def check_device(device):
    """The torch device to use: `device`, or cuda when available, else cpu. A device that this
    machine does not have is a CLIError, before any model is loaded."""
    import torch
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise CLIError(f"--device {device}: not a torch device (use cpu, cuda or cuda:N)") from err
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {device}: no CUDA device is available on this machine "
                           "(torch.cuda.is_available() is False); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise CLIError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                           f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def cpu_has_native_bfloat16(cpuinfo="/proc/cpuinfo"):
    """Whether this CPU computes in bfloat16 natively (x86 AVX512-BF16 or AMX-BF16, ARM BF16),
    where CLIP_benchmark's default bfloat16 autocast is fast; without it, autocast on the CPU
    is often several times slower than float32. From the CPU's flags in `cpuinfo` (Linux);
    None when they cannot be read."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
