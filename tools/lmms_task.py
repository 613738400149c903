"""A five-question lmms-eval task that runs offline, for trying tokenprune's lmms-eval models
without downloading a model or a benchmark (docs/lmms-eval.md, "Trying it offline").

    python tools/lmms_task.py OUTDIR [--name tokenprune_colours]

writes into OUTDIR the task's YAML (colours.yaml), its functions (colours_utils.py) and its data
(colours.jsonl: five plain-coloured pictures of different sizes, each with a question about its
colour and the colour's name as the answer), then prints the lmms-eval command that runs it on a
tiny model saved by tools/tiny_llava.py or tools/tiny_qwen_vl.py. Those models have random
weights: the scores say nothing, the run shows that the pieces fit together (the pruning, the
image tokens per image in the results, batches). From Python (tests/ put tools/ on sys.path):

    from lmms_task import write_task
    yaml_path = write_task("task/")
"""
import argparse
import json
import os
import sys

TASK = "tokenprune_colours"
QUESTIONS = ["what color is it ?", "what is the color of the picture ?", "what is this ?"]
# (name, RGB): words the tiny models' vocabulary knows. Sizes differ so that the pictures give
# Qwen-VL grids of different sizes and a batch of questions of different lengths is padded.
COLOURS = [("red", (220, 40, 40)), ("green", (40, 170, 60)), ("blue", (40, 60, 220)),
           ("yellow", (230, 220, 40)), ("purple", (140, 50, 180))]
DOCS = [{"id": i, "size": [24 + 8 * i, 32], "rgb": list(rgb),
         "question": QUESTIONS[i % len(QUESTIONS)], "answer": name}
        for i, (name, rgb) in enumerate(COLOURS)]

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function colours_utils.doc_to_visual
doc_to_text: !function colours_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 5
  temperature: 0
  do_sample: false
process_results: !function colours_utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""

TASK_UTILS = '''"""The functions of the task in colours.yaml (written by tools/lmms_task.py)."""
from PIL import Image


def doc_to_visual(doc):
    return [Image.new("RGB", tuple(doc["size"]), tuple(doc["rgb"]))]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact": float(results[0].strip().lower() == doc["answer"])}
'''


def write_task(outdir, name=TASK, docs=DOCS):
    """Write the task (colours.yaml, colours_utils.py, colours.jsonl) into `outdir`, made if
    missing; returns the YAML's path. `docs`: the questions, as DOCS holds them."""
    os.makedirs(outdir, exist_ok=True)
    data = os.path.abspath(os.path.join(outdir, "colours.jsonl"))
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(doc) + "\n" for doc in docs)
    with open(os.path.join(outdir, "colours_utils.py"), "w", encoding="utf-8") as f:
        f.write(TASK_UTILS)
    yaml_path = os.path.join(outdir, "colours.yaml")
    with open(yaml_path, "w", encoding="utf-8") as f:
        # lmms-eval reads data_files relative to where it runs, so the path is absolute; a JSON
        # string is a valid YAML scalar whatever the path holds.
        f.write(TASK_YAML.format(name=name, data=json.dumps(data)))
    return yaml_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="folder to write the task into")
    parser.add_argument("--name", default=TASK, help="the task's name (default %(default)s)")
    args = parser.parse_args(argv)
    write_task(args.outdir, args.name)
    print(f"wrote the {len(DOCS)}-question task {args.name} into {args.outdir}; run it with\n"
          f"  python -m lmms_eval --model tokenprune_llava_hf --model_args "
          f"pretrained=MODEL_DIR,dtype=float32,k_anchors=2,top_m=3 --tasks {args.name} "
          f"--include_path {args.outdir} --device cpu --batch_size 2 --output_path OUT "
          f"--log_samples\n"
          f"(MODEL_DIR from python tools/tiny_llava.py MODEL_DIR; docs/lmms-eval.md has the "
          f"Qwen-VL form)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
