"""The README's Python code blocks run as written, in order, in one namespace (the later ones use the `pipe` and
`generate` of the earlier ones), with small settings: training runs 2 iterations. The README cannot drift from
the code."""
import os
import re

import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
SMALL = [(r"\biterations=\d+", "iterations=2")]


def python_blocks() -> list[str]:
    with open(README, encoding="utf-8") as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), re.S | re.M)


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)   # the blocks write under out/
    namespace: dict = {}
    for i, block in enumerate(blocks, 1):
        for pattern, small in SMALL:
            block = re.sub(pattern, small, block)
        exec(compile(block, f"README.md, python block {i}", "exec"), namespace)
    # what the blocks' comments promise
    assert namespace["images"].shape[1:] == (3, 32, 32) and not namespace["images"].requires_grad
    assert namespace["scores"].shape == (2,) and torch.isfinite(namespace["both"]).all()
    assert os.path.isfile(tmp_path / "out" / "r0" / "r0_lora.safetensors")
    assert os.path.isfile(tmp_path / "out" / "rpo_vum" / "rpo_lora.safetensors")
