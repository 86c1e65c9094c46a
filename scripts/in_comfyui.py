"""What the scripts that run inside a ComfyUI checkout share (not part of CI): importing ComfyUI as its server
does (its command line parsed with --cpu, the pack loaded by its own custom-node loader), running a node as its
executor does, keeping its warnings, and running a trainer node under the progress hook the Cancel button uses.

    cd <ComfyUI> && <ComfyUI's python> <pack>/scripts/<script>.py      (each script imports this module first)
"""
import asyncio
import logging
import os
import sys

import torch

torch.set_num_threads(1)   # the checks are small; the machine's other core belongs to other jobs
PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(PACK, "benchmarks", "results")
sys.path.insert(0, os.getcwd())
sys.argv[1:] = ["--cpu"]   # ComfyUI parses its command line when imported, if told to
import comfy.options  # noqa: E402
comfy.options.enable_args_parsing()

import comfy.model_management  # noqa: E402
import comfy.utils  # noqa: E402
import nodes  # noqa: E402

asyncio.run(nodes.load_custom_node(PACK))   # as the server imports custom_nodes/<pack>
NODES = nodes.NODE_CLASS_MAPPINGS


class Messages(logging.Handler):
    """ComfyUI's warnings while it is attached (a LoRA's "lora key not loaded" / "NOT LOADED" lines), as text."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self)

    def not_loaded(self) -> list[str]:
        return [m for m in self.lines if "not loaded" in m.lower()]


def run(cls, *args, **kwargs):
    """A node by its id, called as ComfyUI's executor calls it (under inference mode)."""
    node = NODES[cls]()
    with torch.inference_mode():
        return getattr(node, node.FUNCTION)(*args, **kwargs)


def queued(cls, *args, hook=None, **kwargs):
    """A node run as if queued: ComfyUI's progress hook is set (it raises once interrupted, as in the server),
    hook(value) is called at each progress step (to press Cancel). Returns (outputs or None, the interrupt's
    error name or None, the progress values)."""
    calls = []

    def progress(value, total, preview, node_id=None):
        calls.append(value)
        if hook is not None:
            hook(value)
        comfy.model_management.throw_exception_if_processing_interrupted()
    comfy.utils.set_progress_bar_global_hook(progress)
    try:
        return run(cls, *args, **kwargs), None, calls
    except comfy.model_management.InterruptProcessingException as e:
        return None, type(e).__name__, calls
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)


def cancel_at(step: int):
    """A queued() hook that presses Cancel when progress reaches `step`."""
    def hook(value):
        if value == step:
            comfy.model_management.interrupt_current_processing(True)
    return hook
