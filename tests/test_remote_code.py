"""A converted checkpoint loads with transformers alone: upcycle cannot even be imported in the loader."""

import json
import subprocess
import sys
import textwrap

import torch

LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["upcycle"] = None  # any `import upcycle` now fails: only the checkpoint's own code may run
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
    assert not type(model).__module__.startswith("upcycle"), type(model).__module__
    tokens = torch.tensor(json.loads(sys.argv[2]))
    with torch.no_grad():
        logits = model(tokens).logits
    generated = model.generate(tokens[:1, :4], max_new_tokens=6, do_sample=False)
    print(json.dumps({"module": type(model).__module__, "logits": logits.tolist(), "generated": generated.tolist()}))
    """
)


def test_loads_without_upcycle(converted, source_model, tmp_path):
    tokens = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(converted), json.dumps(tokens.tolist())],
        capture_output=True, text=True, check=False, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                           "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["module"].startswith("transformers_modules")
    with torch.no_grad():
        expected = source_model(tokens).logits
    torch.testing.assert_close(torch.tensor(payload["logits"]), expected, atol=1e-5, rtol=0)
    assert payload["generated"] == source_model.generate(tokens[:1, :4], max_new_tokens=6, do_sample=False).tolist()
