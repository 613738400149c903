"""The documentation: every link in README.md, CHANGELOG.md and docs/ resolves, the API page
names every public name, and the README stays a one-screen answer."""
import os
import re

import pytest

import tokenprune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def markdown_files():
    docs = os.path.join(ROOT, "docs")
    pages = sorted(os.path.join(docs, name) for name in os.listdir(docs) if name.endswith(".md"))
    return [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "CHANGELOG.md")] + pages


def prose_lines(path):
    """The lines of a Markdown file outside fenced code blocks."""
    fenced = False
    for line in open(path, encoding="utf-8").read().splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            yield line


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    seen = {}
    result = set()
    for line in prose_lines(path):
        match = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(path):
    for line in prose_lines(path):
        # Inline code may show link syntax as an example: only real links count.
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            yield target


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_link_resolves(path):
    broken = []
    for target in links(path):
        if re.match(r"^[a-z]+:", target):  # https:, mailto: ... are not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part \
            else path
        if not os.path.exists(dest):
            broken.append(f"{target}: no such file")
        elif anchor and (not dest.endswith(".md") or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading #{anchor} in {os.path.relpath(dest, ROOT)}")
    assert broken == []


def test_the_link_checker_catches_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A `code` heading: yes\n\n[ok](#a-code-heading-yes) "
                    "[bad](#nope) [gone](missing.md)\n```\n[in code](nowhere.md)\n```\n")
    targets = list(links(str(page)))
    assert targets == ["#a-code-heading-yes", "#nope", "missing.md"]
    assert anchors(str(page)) == {"title", "a-code-heading-yes"}


def test_api_page_names_every_public_name():
    page = open(os.path.join(ROOT, "docs", "api.md"), encoding="utf-8").read()
    missing = [name for name in tokenprune.__all__ if f"`{name}" not in page
               and f"**{name}" not in page]
    assert missing == []


def test_readme_is_one_screen_of_answers():
    """The README answers the first questions; the details live in docs/ (issue 14: about 200
    lines at most)."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
    assert len(readme) <= 210
    commands = [line for line in readme if line.startswith("pytest ")]
    assert commands[:1] == ["pytest tests/"]  # the test command that .ci/run calls


def python_blocks(path):
    """(first line number, code) of each ```python block of a Markdown file, in order."""
    blocks, code, start = [], None, 0
    for number, line in enumerate(open(path, encoding="utf-8").read().splitlines(), 1):
        if code is None and line.strip() == "```python":
            code, start = [], number + 1
        elif code is not None and FENCE.match(line.strip()):
            blocks.append((start, "\n".join(code)))
            code = None
        elif code is not None:
            code.append(line)
    return blocks


# page -> how many of its python blocks run here (None: all). README's second loads
# Qwen2.5-VL-7B from the hub.
RUNNABLE_EXAMPLES = {"docs/api.md": None, "README.md": 1}


@pytest.mark.parametrize("name", sorted(RUNNABLE_EXAMPLES))
def test_the_python_examples_run_and_print_what_their_comments_say(monkeypatch, name):
    """The pages' OpenCLIP examples, run in order as a reader would paste them, offline; each
    print's numbers are those its comment gives. docs/api.md's GridEncoder example unpacked two
    values from a GridOutput of three for a while (issue 28)."""
    import sys

    import open_clip
    import torch

    def offline(name, pretrained=None, **kwargs):
        # ViT-B-16's patch grid and depth (224 px in 16-px patches: 196 patches; 12 blocks) at a
        # small width, random weights: the shapes the comments give, in a second, no download.
        assert name == "ViT-B-16"
        torch.manual_seed(0)
        model = open_clip.CLIP(
            embed_dim=32, vision_cfg=dict(image_size=224, patch_size=16, width=64, layers=12,
                                          head_width=32, mlp_ratio=2),
            text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1))
        return model.eval(), None, None

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    printed = []  # (line number, text)

    def capture(*values):
        printed.append((sys._getframe(1).f_lineno, " ".join(map(str, values))))

    page = os.path.join(ROOT, name)
    lines = open(page, encoding="utf-8").read().splitlines()
    namespace = {"print": capture, "batches": [torch.randn(2, 3, 224, 224)]}
    blocks = python_blocks(page)[:RUNNABLE_EXAMPLES[name]]
    assert blocks
    for start, code in blocks:
        # Padded so that line numbers in tracebacks and `printed` are the page's own.
        exec(compile("\n" * (start - 1) + code, page, "exec"), namespace)
    assert printed
    for number, text in printed:
        comment = lines[number - 1].partition("#")[2]
        said = [int(n) for group in re.findall(r"\(([\d, ]+)\)", comment)
                for n in group.split(",")]
        assert [int(n) for n in re.findall(r"\d+", text)] == said, (number, text, comment)
