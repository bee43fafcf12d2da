"""Downstream tasks every machine can run offline, built from the held-out part of the demo corpus.

Two lm-evaluation-harness tasks, written as YAML + jsonl by `write_local_tasks(folder)`:
- `upcycle_stdlib_module` (multiple choice, 4 options): which standard-library module a docstring excerpt comes
  from. The excerpt is a paragraph of the module's docstrings with the module's own name masked (`___`); the three
  wrong options are other held-out modules. Metrics: acc and acc_norm (chance: 0.25).
- `upcycle_stdlib_cloze` (LAMBADA-style): predict the word that ends a line of a held-out source file or pydoc
  topic from the whole lines before it (at most MAX_CONTEXT_CHARS, a few hundred tokens). As in LAMBADA, a target
  (an identifier or word of 3+ characters, not the line's first word) must occur earlier in its passage, so the
  passage holds what predicting it needs. Metrics: acc (the word is the model's greedy continuation) and
  perplexity of the word.
Both read only documents that `upcycle.data.corpus.demo_part` puts in the held-out part, so the demo's models
never trained on them. Everything is a pure function of the installed Python's standard library (sorted
documents; choices, answer positions and cloze passages fixed by a stable hash): every run on the same Python
writes the same items.
"""

import hashlib
import json
import os
import re
import sys
import sysconfig
from pathlib import Path

import yaml

from ..checkpoint.output_dir import atomic_output_dir
from ..data.corpus import demo_documents, demo_part, stable_fraction
from ..errors import UpcycleError

MODULE_TASK = "upcycle_stdlib_module"
CLOZE_TASK = "upcycle_stdlib_cloze"
LOCAL_TASKS = (MODULE_TASK, CLOZE_TASK)
TASKS_VERSION = 2  # bump when the items change: a cached folder of another version is rebuilt

CHOICES = 4
ITEMS_PER_MODULE = 4  # so that a few long modules (doctest, subprocess) do not make up the task
MIN_EXCERPT_CHARS, MAX_EXCERPT_CHARS = 80, 400
MASK = "___"
MODULE_QUESTION = "Question: Which module of the Python standard library is this docstring from?\nAnswer:"
CLOZE_ITEMS_PER_DOCUMENT = 10  # at most, so that a few long files (doctest, subprocess) do not make up the task
MAX_CONTEXT_CHARS = 600  # whole lines before the target: up to ~270 tokens of the demo's 4k BPE (mean ~160)
MIN_CONTEXT_CHARS = 200
# A line-final word: an identifier or word of 3+ characters, then only closing brackets, quotes and one , . : ;
LINE_FINAL_WORD = re.compile(r"(?<!\w)(?P<word>[A-Za-z_][A-Za-z0-9_]{2,})[)\]}'\"]*[.,:;]?[)\]}'\"]*$",
                             re.MULTILINE)


def _heldout_documents() -> list[tuple[str, str]]:
    """(name, text) of the demo corpus' held-out documents (pydoc topics, module docstrings, source files), in
    corpus order."""
    return [(name, text) for name, text in demo_documents() if demo_part(name) == "heldout"]


def _is_public(module: str) -> bool:
    return not any(part.startswith("_") for part in module.split("."))


def _mask_module_name(text: str, module: str) -> str:
    """Hide the answer: the dotted name and its last part, as whole words."""
    for name in sorted({module, module.rsplit(".", 1)[-1]}, key=len, reverse=True):
        text = re.sub(rf"(?<![\w.]){re.escape(name)}(?![\w])", MASK, text)
    return text


def _excerpt(paragraph: str) -> str:
    """At most MAX_EXCERPT_CHARS of a paragraph, cut at a word boundary."""
    text = " ".join(paragraph.split())
    return text if len(text) <= MAX_EXCERPT_CHARS else text[:MAX_EXCERPT_CHARS].rsplit(" ", 1)[0] + " ..."


def module_items(documents: list[tuple[str, str]] | None = None) -> list[dict]:
    """Multiple-choice items: {"docstring", "choices" (module names), "gold" (index)}; see the module docstring."""
    documents = _heldout_documents() if documents is None else documents
    modules = {name.removeprefix("module:"): text for name, text in documents
               if name.startswith("module:") and _is_public(name.removeprefix("module:"))}
    items = []
    for module, text in modules.items():
        paragraphs = [_excerpt(_mask_module_name(paragraph, module)) for paragraph in text.split("\n\n")]
        paragraphs = [paragraph for paragraph in paragraphs
                      if len(paragraph) >= MIN_EXCERPT_CHARS and ">>>" not in paragraph]  # no doctest sessions
        for number, excerpt in enumerate(paragraphs[:ITEMS_PER_MODULE]):
            key = f"{module}#{number}"
            others = sorted((other for other in modules if other != module),
                            key=lambda other, key=key: stable_fraction(f"{key}|{other}"))[:CHOICES - 1]
            if len(others) < CHOICES - 1:
                continue
            gold = int(stable_fraction(key) * CHOICES)
            items.append({"docstring": excerpt, "choices": [*others[:gold], module, *others[gold:]], "gold": gold})
    return items


def _passage_start(text: str, target_start: int) -> int:
    """Where the passage of a target at `target_start` begins: the earliest line start within MAX_CONTEXT_CHARS."""
    begin = text.rfind("\n", 0, target_start) + 1
    while begin > 0:
        previous = text.rfind("\n", 0, begin - 1) + 1
        if target_start - previous > MAX_CONTEXT_CHARS:
            break
        begin = previous
    return begin


def _cloze_candidates(text: str) -> list[tuple[int, int, str]]:
    """(passage start, target start, target) of every line-final word that is not its line's first word and
    occurs, as a whole word, in the MIN_CONTEXT_CHARS..MAX_CONTEXT_CHARS of whole lines before it."""
    candidates = []
    for match in LINE_FINAL_WORD.finditer(text):
        start, word = match.start("word"), match.group("word")
        line = text[text.rfind("\n", 0, start) + 1:start]
        if not line.strip() or line.endswith("  "):  # first word of its line, or set apart by spaces (a table)
            continue
        begin = _passage_start(text, start)
        context = text[begin:start]
        if len(context) >= MIN_CONTEXT_CHARS and re.search(rf"(?<!\w){re.escape(word)}(?!\w)", context):
            candidates.append((begin, start, word))
    return candidates


def cloze_items(documents: list[tuple[str, str]] | None = None) -> list[dict]:
    """LAMBADA-style items {"context", "separator", "target"} from held-out source files and pydoc topics (the
    module docstring documents repeat the source files' docstrings); see the module docstring.

    Per document at most CLOZE_ITEMS_PER_DOCUMENT passages that do not overlap, picked in the order of a stable
    hash of (document, position) and written in document order. `context` ends before the space (`separator`,
    " " or "") that precedes the target, since lm-eval scores `separator + target` after the context.
    """
    documents = _heldout_documents() if documents is None else documents
    items = []
    for name, text in documents:
        if name.startswith("module:"):
            continue
        chosen: list[tuple[int, int, str]] = []
        for begin, start, word in sorted(_cloze_candidates(text),
                                         key=lambda candidate: stable_fraction(f"{name}@{candidate[1]}")):
            if all(start <= other_begin or other_start <= begin for other_begin, other_start, _ in chosen):
                chosen.append((begin, start, word))
            if len(chosen) == CLOZE_ITEMS_PER_DOCUMENT:
                break
        for begin, start, word in sorted(chosen):
            context = text[begin:start]
            separator = " " if context.endswith(" ") else ""
            items.append({"context": context.removesuffix(separator), "separator": separator, "target": word})
    return items


def _task_configs(folder: Path) -> dict[str, dict]:
    """lm-eval task configs, reading the jsonl files in `folder` (absolute paths: lm-eval resolves relative ones
    against the working directory)."""
    def dataset(task: str) -> dict:
        return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(folder / f"{task}.jsonl")}},
                "test_split": "test"}

    return {
        MODULE_TASK: {
            "task": MODULE_TASK, **dataset(MODULE_TASK), "output_type": "multiple_choice",
            "doc_to_text": "Docstring: {{docstring}}\n" + MODULE_QUESTION,
            "doc_to_choice": "{{choices}}", "doc_to_target": "gold",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": TASKS_VERSION},
        },
        CLOZE_TASK: {
            "task": CLOZE_TASK, **dataset(CLOZE_TASK), "output_type": "loglikelihood",
            "doc_to_text": "{{context}}", "doc_to_target": "{{separator + target}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}],
            "metadata": {"version": TASKS_VERSION},
        },
    }


def _write_tasks(folder: Path, documents: list[tuple[str, str]] | None) -> None:
    documents = _heldout_documents() if documents is None else documents
    for task, items in ((MODULE_TASK, module_items(documents)), (CLOZE_TASK, cloze_items(documents))):
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")


def write_local_tasks(folder: Path, documents: list[tuple[str, str]] | None = None) -> list[str]:
    """Write the two tasks into FOLDER (created atomically: all of it or nothing) and return their names.

    The YAML files name the jsonl files by absolute path, so the folder is usable where it was written (move it and
    write it again). `documents` defaults to the held-out part of the demo corpus.
    """
    folder = Path(folder).resolve()
    ours = {f"{task}.{suffix}" for task in LOCAL_TASKS for suffix in ("yaml", "jsonl")}
    if folder.is_dir() and any(path.name not in ours for path in folder.iterdir()):
        raise UpcycleError(f"{folder} holds other files; the local tasks are written into a folder of their own")
    with atomic_output_dir(folder, overwrite=True) as staging:
        _write_tasks(staging, documents)
        for task, config in _task_configs(folder).items():
            (staging / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return list(LOCAL_TASKS)


def cached_local_tasks() -> Path:
    """The folder of the shipped tasks, written on first use under the user's cache (UPCYCLE_CACHE, else
    $XDG_CACHE_HOME/upcycle or ~/.cache/upcycle), one folder per Python standard library and task version."""
    root = Path(os.environ.get("UPCYCLE_CACHE") or
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "upcycle")
    stdlib = sysconfig.get_paths()["stdlib"]
    key = hashlib.sha256(f"{sys.version}|{stdlib}|{TASKS_VERSION}".encode()).hexdigest()[:16]
    folder = root / "lm_eval_tasks" / key
    if not all((folder / f"{task}.yaml").is_file() for task in LOCAL_TASKS):
        write_local_tasks(folder)
    return folder
