"""The dataset names that `eval` and `sweep` accept, checked before anything loads:
CLIP_benchmark's (read from the source of its dataset builder, which keeps no list of them and
takes seconds to import), its collections, and the shipped canvases (shipped_rules.py)."""
import difflib
import functools
import os
from typing import NamedTuple

from .checks import as_list
from .common import CLIError
from .shipped_rules import SHIPPED_DATASETS


class KnownDatasets(NamedTuple):
    """The dataset names CLIP_benchmark's build_dataset accepts (names, and prefixes such as
    wds/ that take any name after them), those of its vtab/ branch, and its collections."""
    names: frozenset
    prefixes: tuple
    vtab_names: frozenset
    vtab_prefixes: tuple
    collections: frozenset


def _strings(node):
    """The string constants of an AST node: a constant, or a tuple, list or set of them."""
    import ast
    elements = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return {e.value for e in elements if isinstance(e, ast.Constant) and isinstance(e.value, str)}


def _compared_names(function, variable="dataset_name"):
    """(names, prefixes): the strings that `variable` is compared with (== or in) and the
    prefixes it is tested for (.startswith) in a parsed function."""
    import ast
    names, prefixes = set(), set()
    for node in ast.walk(function):
        if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name)
                and node.left.id == variable
                and all(isinstance(op, (ast.Eq, ast.In)) for op in node.ops)):
            for comparator in node.comparators:
                names |= _strings(comparator)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "startswith" and isinstance(node.func.value, ast.Name)
              and node.func.value.id == variable):
            for arg in node.args:
                prefixes |= _strings(arg)
    return names, prefixes


@functools.lru_cache(maxsize=None)
def clip_benchmark_datasets():
    """The KnownDatasets of the installed clip-benchmark, read from the source of
    clip_benchmark/datasets/builder.py (the names its build_dataset and build_vtab_dataset
    compare `dataset_name` with, and its `dataset_collection`): CLIP_benchmark keeps no list of
    them, and importing that module takes seconds (torchvision's model zoo). None when the
    source cannot be read as expected; then no name is refused before loading."""
    import ast
    from importlib.util import find_spec
    try:  # the package's folder, found without importing it
        folder = os.path.dirname(find_spec("clip_benchmark").origin)
        with open(os.path.join(folder, "datasets", "builder.py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (ImportError, AttributeError, TypeError, ValueError, OSError, SyntaxError):
        return None
    functions, collections = {}, None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            functions[node.name] = node
        elif (isinstance(node, ast.Assign) and len(node.targets) == 1
              and isinstance(node.targets[0], ast.Name)
              and node.targets[0].id == "dataset_collection"):
            try:
                collections = ast.literal_eval(node.value)
            except ValueError:
                return None
    if "build_dataset" not in functions or "build_vtab_dataset" not in functions or \
            not isinstance(collections, dict):
        return None
    names, prefixes = _compared_names(functions["build_dataset"])
    vtab_names, vtab_prefixes = _compared_names(functions["build_vtab_dataset"])
    if "cifar10" not in names or "wds/" not in prefixes:  # not the builder we know how to read
        return None
    return KnownDatasets(frozenset(names), tuple(sorted(prefixes)), frozenset(vtab_names),
                         tuple(sorted(vtab_prefixes)), frozenset(collections))


def _dataset_known(name, known):
    if name in known.names or name in known.collections or name in SHIPPED_DATASETS:
        return True
    if name.startswith("vtab/"):
        tail = name[len("vtab/"):]
        return tail in known.vtab_names or tail.startswith(known.vtab_prefixes)
    return name.startswith(known.prefixes)


def check_datasets(args):
    """eval's and sweep's --dataset, before the model loads: every name is one CLIP_benchmark
    or tokenprune knows (else the closest ones are offered), a collection, or a file listing
    datasets; a local WebDataset's folder is checked by webdataset_workers."""
    known = clip_benchmark_datasets()
    for name in as_list(args.dataset):
        if known is None or os.path.isfile(name) or _dataset_known(name, known):
            continue
        choices = sorted(known.names | known.collections | set(SHIPPED_DATASETS) |
                         {f"vtab/{vtab}" for vtab in known.vtab_names})
        close = difflib.get_close_matches(name, choices, n=3)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise CLIError(f"unknown dataset {name!r}: not a CLIP_benchmark or tokenprune dataset."
                       f"{hint} Use a CLIP_benchmark dataset (cifar10, imagenet1k, vtab/..., a "
                       f"collection such as vtab), a shipped one ({', '.join(SHIPPED_DATASETS)}: "
                       "offline) or a local WebDataset: --dataset wds/NAME --dataset_root DIR")
