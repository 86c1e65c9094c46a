"""Run by tests/test_distributed.py, under torchrun or in-process: R0 (with the implicit CFG reward and η per
image) and RPO (keeping its validated weights) train a few steps on the tiny model into <out>/r0 and <out>/rpo,
and each process records the files it wrote (audit events: Python opens for writing and renames, which every
atomic save ends with) in <out>/writes-<rank>.json.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_job.py <out>
"""
import json
import os
import sys

import torch

# Adam divides each gradient element by its own size, so the float-level differences between a whole batch's
# gradient and the mean of its halves' move near-zero elements by up to about lr: at 1e-4 the two LoRAs agree
# to ~5e-6 (at 1e-2, to ~1e-3)
LR = 1e-4


def train_both(out: str) -> None:
    from r0_core.loading import TINY, load_pipeline
    from r0_core.rewards import load_reward
    from r0_core.tiny import subjects
    from r0_core.train import R0Config, train_r0
    from rpo_core.train import RPOConfig, train_rpo

    torch.set_num_threads(1)
    clip = load_reward("clip", TINY)
    train_r0(load_pipeline(TINY), clip, R0Config(prompts=["a red circle on the left", "a blue square at the top",
                                                          "a green triangle left of a yellow circle"],
                                                 iterations=2, batch_size=2, steps=2, cfg_reward_weight=1.0,
                                                 eta_per_image=True, lr=LR), os.path.join(out, "r0"))
    subject = subjects.SUBJECTS[1]
    references = torch.from_numpy(subjects.references(subject)).permute(0, 3, 1, 2).float()
    train_rpo(load_pipeline(TINY), clip, references,
              RPOConfig(token=subject.token, class_name=subject.shape, prompts=subjects.training_prompts(subject)[:2],
                        iterations=2, batch_size=2, negatives_per_prompt=1, validate_every=1, validation_images=1,
                        keep_validated=True, lr=LR), os.path.join(out, "rpo"))


def main(out: str) -> None:
    written = []

    def audit(event, args):
        if event == "os.rename" or event == "open" and args[1] and any(c in str(args[1]) for c in "wax+"):
            written.append(os.fspath(args[1] if event == "os.rename" else args[0]))
    sys.addaudithook(audit)
    train_both(out)
    rank = int(os.environ.get("RANK", "0"))
    mine = sorted({p for p in written if isinstance(p, str) and os.path.abspath(p).startswith(os.path.abspath(out))})
    with open(os.path.join(out, f"writes-{rank}.json"), "w") as f:
        json.dump(mine, f)


if __name__ == "__main__":
    main(sys.argv[1])
