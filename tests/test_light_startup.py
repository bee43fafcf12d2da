"""`upcycle --help` and a plain `upcycle convert` (safetensors source, no cast) never import torch or transformers.

That is what lets a conversion run near the speed of `cp -r` (bench/convert.py): importing torch alone takes
seconds. Each case runs the real entry point in a fresh interpreter and reports which heavy modules it loaded.
"""

import json
import subprocess
import sys

import torch
from conftest import folder_digest

from upcycle.checkpoint.loading import load_causal_lm

HEAVY = ("torch", "transformers", "accelerate", "peft", "huggingface_hub.hf_api")  # hf_api: the Hub client
RUN_AND_REPORT = """
import json, sys
from upcycle.cli import main
sys.argv = ["upcycle", *json.loads(sys.argv[1])]
try:
    main()
finally:
    print(json.dumps(sorted(name for name in {heavy!r} if name in sys.modules)))
"""


def heavy_modules_loaded(*args) -> list[str]:
    done = subprocess.run([sys.executable, "-c", RUN_AND_REPORT.format(heavy=HEAVY), json.dumps(list(map(str, args)))],
                          capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_imports_nothing_heavy():
    assert heavy_modules_loaded("--help") == []
    assert heavy_modules_loaded("train", "--help") == []


def test_plain_conversion_imports_nothing_heavy_and_preserves_the_function(tmp_path, per_expert_source,
                                                                          source_model):
    before = folder_digest(per_expert_source)
    assert heavy_modules_loaded("convert", per_expert_source, tmp_path / "out", "--link", "copy") == []
    assert folder_digest(per_expert_source) == before
    tokens = torch.randint(0, source_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        converted = load_causal_lm(tmp_path / "out")(tokens).logits
        torch.testing.assert_close(converted, source_model(tokens).logits, rtol=0, atol=1e-5)


def test_a_cast_does_import_torch(tmp_path, per_expert_source):
    assert "torch" in heavy_modules_loaded("convert", per_expert_source, tmp_path / "out", "--dtype", "bfloat16")
