"""Text every machine has: the CPython standard library's own documentation, as a corpus of documents.

Two sources, both read without importing any standard-library module other than `pydoc_data` (importing
arbitrary modules runs their side effects):
- pydoc topics (`pydoc_data.topics`): the language reference sections `help()` shows, one document each;
- docstrings of every standard-library source file, read with `ast`: one document per module holding its
  module docstring, then the docstrings of its classes, functions and methods in source order.
Order is deterministic (topics sorted by name, then modules sorted by dotted name), and the held-out split is
fixed by a stable hash of each document's name, so every machine with the same Python gets the same corpus.

The demo corpus (`write_demo_corpus`) adds the source files themselves (`stdlib_source_documents`) and cuts three
parts by a stable hash of the module (or topic) name: source.txt trains the demo's source model, adaptation.txt
is what continued training and calibration read, heldout.txt is only evaluated; a module's docstring document and
its source file always fall in the same part.
"""

import ast
import functools
import hashlib
import inspect
import io
import re
import sysconfig
import tokenize
from pathlib import Path

# Folders of the standard library that are tests, demos or vendored packages rather than documentation.
SKIPPED_FOLDERS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "turtledemo",
                   "lib2to3", "ensurepip", "venv", "config-3"}
DOCUMENT_SEPARATOR = "\n\n\n"  # two blank lines; inside a document runs of blank lines are collapsed to one
MIN_DOCUMENT_CHARS = 40  # shorter documents (a one-line "Helper." docstring module) carry next to no text


def pydoc_topic_documents() -> list[tuple[str, str]]:
    """(name, text) for each pydoc topic, sorted by topic name."""
    from pydoc_data.topics import topics

    return [(f"topic:{name}", topics[name]) for name in sorted(topics)]


def _docstrings_in_order(tree: ast.Module) -> list[str]:
    """The module docstring, then every class/function docstring, in source order."""
    docstrings = []
    module_doc = ast.get_docstring(tree, clean=True)
    if module_doc:
        docstrings.append(module_doc)
    nodes = [node for node in ast.walk(tree)
             if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in sorted(nodes, key=lambda node: (node.lineno, node.col_offset)):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            docstrings.append(doc)
    return docstrings


def _module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def stdlib_source_files(stdlib: Path | None = None) -> list[tuple[str, Path]]:
    """(dotted module name, path) of every standard-library source file, sorted by module name."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    files = []
    for path in stdlib.rglob("*.py"):
        relative = path.relative_to(stdlib)
        if any(part in SKIPPED_FOLDERS or part.startswith("config-") for part in relative.parts[:-1]):
            continue
        files.append((_module_name(relative), path))
    return sorted(files)


def module_docstring_documents(stdlib: Path | None = None) -> list[tuple[str, str]]:
    """(name, text) per standard-library module that has docstrings, sorted by module name."""
    documents = []
    for module, path in stdlib_source_files(stdlib):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):  # e.g. a source file kept for another Python version
            continue
        text = "\n\n".join(_docstrings_in_order(tree))
        if text:
            documents.append((f"module:{module}", text))
    return documents


def normalize_document(text: str) -> str:
    """Clean indentation, strip trailing spaces and collapse runs of blank lines, so that two blank lines
    can separate documents in a .txt file."""
    lines = [line.rstrip() for line in inspect.cleandoc(text).splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def stdlib_documents(stdlib: Path | None = None) -> list[tuple[str, str]]:
    """Every document of the corpus: pydoc topics, then module docstrings; deterministic order.

    Parsing the standard library takes a few seconds, so the result is cached for the process.
    """
    return list(_stdlib_documents(None if stdlib is None else str(stdlib)))


@functools.lru_cache(maxsize=2)
def _stdlib_documents(stdlib: str | None) -> tuple[tuple[str, str], ...]:
    documents = []
    for name, text in pydoc_topic_documents() + module_docstring_documents(None if stdlib is None else Path(stdlib)):
        text = normalize_document(text)
        if len(text) >= MIN_DOCUMENT_CHARS:
            documents.append((name, text))
    return tuple(documents)


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by `key` alone (sha256; Python's hash() changes between runs)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_documents(documents: list[tuple[str, str]], heldout_fraction: float = 0.1
                    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out): a document is held out when the stable hash of its name falls below the fraction.

    The split of a document never depends on the other documents, so it survives adding or removing some.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError("heldout_fraction must be in [0, 1)")
    train = [document for document in documents if stable_fraction(document[0]) >= heldout_fraction]
    heldout = [document for document in documents if stable_fraction(document[0]) < heldout_fraction]
    return train, heldout


def write_corpus(folder: Path, heldout_fraction: float = 0.1,
                 documents: list[tuple[str, str]] | None = None) -> dict[str, dict[str, int]]:
    """Write train.txt and heldout.txt (documents separated by two blank lines) and return their sizes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train, heldout = split_documents(stdlib_documents() if documents is None else documents, heldout_fraction)
    sizes = {}
    for name, part in (("train", train), ("heldout", heldout)):
        text = DOCUMENT_SEPARATOR.join(text for _, text in part) + "\n"
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
        sizes[name] = {"documents": len(part), "chars": len(text)}
    return sizes


# Source files that are generated tables or copies rather than code a person wrote: the pydoc topics again
# (pydoc_data.topics), this machine's build configuration (_sysconfigdata_*), character and entity tables.
GENERATED_MODULES = {"pydoc_data.topics", "html.entities", "stringprep", "re._casefix"}
DEMO_PARTS = ("source", "adaptation", "heldout")
DEMO_FRACTIONS = {"heldout": 0.1, "adaptation": 0.18}  # the rest (0.72) is source; see demo_part


def _is_generated_source(module: str, text: str) -> bool:
    """Generated tables: the listed modules, build configuration, the character-mapping codecs' tables."""
    return (module in GENERATED_MODULES or module.startswith("_sysconfigdata")
            or (module.startswith("encodings.") and ("decoding_table" in text or "decoding_map" in text)))


def normalize_source(text: str) -> str:
    """A source file as it is, except: newlines made \\n, trailing whitespace stripped, runs of blank lines
    collapsed to one (two blank lines separate documents in a .txt file), leading/trailing blank lines dropped.
    Unlike normalize_document, indentation, tabs and form feeds inside lines are kept."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def stdlib_source_documents(stdlib: Path | None = None) -> list[tuple[str, str]]:
    """("source:<module>", text) per standard-library source file, sorted by module name; generated tables
    (`_is_generated_source`) and files too short to carry text are left out."""
    documents = []
    for module, path in stdlib_source_files(stdlib):
        try:
            raw = path.read_bytes()
            encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
            text = raw.decode(encoding)
        except (SyntaxError, UnicodeDecodeError, LookupError, OSError):  # unreadable or undecodable: skip
            continue
        text = normalize_source(text.removeprefix("\ufeff"))
        if len(text) >= MIN_DOCUMENT_CHARS and not _is_generated_source(module, text):
            documents.append((f"source:{module}", text))
    return documents


def split_key(name: str) -> str:
    """The name the demo split hashes: a module's docstring document and its source file share
    "module:<module>"; a pydoc topic keeps "topic:<name>"."""
    kind, _, rest = name.partition(":")
    return f"module:{rest}" if kind in ("module", "source") else name


def demo_part(name: str) -> str:
    """"source", "adaptation" or "heldout" for a document, from the stable hash of its split_key alone."""
    fraction = stable_fraction(split_key(name))
    if fraction < DEMO_FRACTIONS["heldout"]:
        return "heldout"
    if fraction < DEMO_FRACTIONS["heldout"] + DEMO_FRACTIONS["adaptation"]:
        return "adaptation"
    return "source"


def demo_documents(stdlib: Path | None = None) -> list[tuple[str, str]]:
    """The demo corpus' documents: pydoc topics and module docstrings (stdlib_documents), then the source files."""
    return stdlib_documents(stdlib) + stdlib_source_documents(stdlib)


def write_demo_corpus(folder: Path, stdlib: Path | None = None) -> dict[str, dict[str, int]]:
    """Write source.txt, adaptation.txt and heldout.txt (documents separated by two blank lines, split by
    `demo_part`) and return {part: {"documents": n, "chars": n}}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = {part: [] for part in DEMO_PARTS}
    for name, text in demo_documents(stdlib):
        parts[demo_part(name)].append(text)
    sizes = {}
    for part, texts in parts.items():
        text = DOCUMENT_SEPARATOR.join(texts) + "\n"
        (folder / f"{part}.txt").write_text(text, encoding="utf-8")
        sizes[part] = {"documents": len(texts), "chars": len(text)}
    return sizes


if __name__ == "__main__":
    import sys
    import tempfile

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="stdlib-corpus-"))
    print(target, write_corpus(target))
