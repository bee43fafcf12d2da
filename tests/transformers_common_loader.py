"""Import transformers' own common model tests (`ModelTesterMixin`) from its source distribution.

transformers' wheel has no tests; its sdist on the package index carries the top-level common test modules
(tests/test_modeling_common.py and friends) but not tests/generation/ nor tests/exporters/, which
test_modeling_common imports relatively. `make test` downloads the sdist of the installed transformers version at
install time and unpacks its tests/ into .venv/transformers-tests/tests (see the Makefile); nothing is downloaded
here. The two missing modules are replaced by our own stand-ins: `ExportTesterMixin` (no export tests: the
exporters test needs transformers' unreleased export API) and `generation_tester.GenerationTesterMixin`.

`load_common_tests()` returns the imported test_modeling_common module, or None and the reason it is unavailable.
"""

import importlib
import os
import sys
import types
import warnings
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
# The folder holding transformers' tests/ (override with UPCYCLE_TRANSFORMERS_TESTS, e.g. for another checkout).
TESTS_FOLDER = Path(os.environ.get("UPCYCLE_TRANSFORMERS_TESTS", REPOSITORY / ".venv" / "transformers-tests" / "tests"))
PACKAGE = "transformers_common_tests"  # the package name test_modeling_common's relative imports resolve against


class ExportTesterMixin:
    """Stand-in for tests/exporters/test_export.py (not in the sdist): no export tests."""


def _stand_in(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def load_common_tests() -> tuple[types.ModuleType | None, str]:
    """(transformers' test_modeling_common module, "") or (None, why it cannot be imported)."""
    import transformers

    common_file = TESTS_FOLDER / "test_modeling_common.py"
    if not common_file.is_file():
        return None, (f"transformers' common tests are not installed ({common_file} missing): run `make test`, "
                      "which unpacks them from transformers' source distribution at install time")
    version_file = TESTS_FOLDER.parent / "VERSION"
    if version_file.is_file() and version_file.read_text().strip() != transformers.__version__:
        return None, (f"{TESTS_FOLDER} holds the tests of transformers {version_file.read_text().strip()}, but "
                      f"{transformers.__version__} is installed: rerun `make test` to unpack the matching ones")
    try:
        import parameterized  # noqa: F401  (test_modeling_common's own test dependency)
    except ImportError:
        return None, "transformers' common tests need the `parameterized` package (installed by `make test`)"
    name = f"{PACKAGE}.test_modeling_common"
    if name in sys.modules:
        return sys.modules[name], ""
    from generation_tester import GenerationTesterMixin

    package = _stand_in(PACKAGE)
    package.__path__ = [str(TESTS_FOLDER)]
    for subpackage in ("exporters", "generation"):
        _stand_in(f"{PACKAGE}.{subpackage}").__path__ = []
    _stand_in(f"{PACKAGE}.exporters.test_export", ExportTesterMixin=ExportTesterMixin)
    _stand_in(f"{PACKAGE}.generation.test_utils", GenerationTesterMixin=GenerationTesterMixin)
    with warnings.catch_warnings():  # transformers' own marks (flash_attn_test...) are not registered here
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        return importlib.import_module(name), ""
