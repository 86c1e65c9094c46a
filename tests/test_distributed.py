"""Data parallel training is exact: two CPU processes (torchrun, gloo) give the LoRA one process gives, because
every process draws the whole batch and keeps its share; only the main process writes."""
import json
import os
import pathlib
import subprocess
import sys

from safetensors.torch import load_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import distributed_job  # noqa: E402


def test_two_processes_train_the_lora_one_process_trains(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    two = tmp_path / "two"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29563",
                    str(ROOT / "tests" / "distributed_job.py"), str(two)], check=True, env=env, timeout=600,
                   capture_output=True)
    one = tmp_path / "one"
    distributed_job.train_both(str(one))
    for run, name in (("r0", "r0_lora.safetensors"), ("rpo", "rpo_lora.safetensors")):
        a, b = load_file(str(one / run / name)), load_file(str(two / run / name))
        assert a.keys() == b.keys() and a
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        moved = max(float(a[k].abs().max()) for k in a if "lora_up" in k)
        assert worst <= 1e-5 and moved > 1e-4, (run, worst, moved)   # the same LoRA, and it did train
    assert json.loads((two / "writes-1.json").read_text()) == [], json.loads((two / "writes-1.json").read_text())
    main = json.loads((two / "writes-0.json").read_text())
    assert any(p.endswith("r0_lora.safetensors") for p in main) and any("validations" in p for p in main)
