"""Every workflow in workflows/ is valid against the node classes and runs headless on the tiny model."""
import json
import pathlib

import numpy as np
import pytest
import torch

from nodes import NODE_CLASS_MAPPINGS
from nodes.headless import CORE_NODES, node_spec, run_workflow, widget_values

WORKFLOWS = sorted((pathlib.Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
# graphs of ComfyUI's own nodes on the native tiny model: run in the real ComfyUI (README), checked here where they
# touch the pack's nodes
NATIVE_WORKFLOWS = sorted((pathlib.Path(__file__).resolve().parents[1] / "workflows" / "native").glob("*.json"))


def check_widgets(node: dict) -> None:
    spec = node_spec(node["type"])
    for name, value in widget_values(node, spec).items():
        kind, options = spec["inputs"][name], spec.get("options", {}).get(name, {})
        if kind == "COMBO":
            assert value in spec["choices"][name], (node["type"], name, value)
        elif kind in ("INT", "FLOAT"):
            assert isinstance(value, (int, float)) and options.get("min", value) <= value <= options.get(
                "max", value), (node["type"], name, value)
        elif kind == "BOOLEAN":
            assert isinstance(value, bool)
        else:
            assert isinstance(value, str)


def check_link(nodes: dict, link: list) -> None:
    """A link's type is its source's output type and its destination's input type, where the pack declares them."""
    link_id, src, src_slot, dst, dst_slot, kind = link
    in_name = nodes[dst]["inputs"][dst_slot]["name"]
    known = lambda n: nodes[n]["type"] in NODE_CLASS_MAPPINGS or nodes[n]["type"] in CORE_NODES  # noqa: E731
    if known(src):
        assert node_spec(nodes[src]["type"])["outputs"][src_slot] == kind, (link_id, kind)
    if known(dst):
        assert node_spec(nodes[dst]["type"])["inputs"][in_name] == kind, (link_id, kind, in_name)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_valid(path):
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4
    assert path.with_suffix(".jpg").is_file(), "each workflow needs a same-name .jpg thumbnail"
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for node in nodes.values():
        assert node["type"] in NODE_CLASS_MAPPINGS or node["type"] in CORE_NODES, node["type"]
        check_widgets(node)
    for link in workflow["links"]:
        check_link(nodes, link)


@pytest.mark.parametrize("path", NATIVE_WORKFLOWS, ids=lambda p: p.name)
def test_native_workflow_is_valid_where_it_uses_the_pack(path):
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4
    nodes = {n["id"]: n for n in workflow["nodes"]}
    pack = [n for n in nodes.values() if n["type"] in NODE_CLASS_MAPPINGS]
    assert any(n["type"] == "R0TinyNativeLoader" for n in pack), "a native workflow runs on the built-in tiny world"
    for node in pack:
        check_widgets(node)
    for link in workflow["links"]:
        check_link(nodes, link)


TRAINERS = ("R0Train", "RPOTrain")
SUITE_STEPS = 8   # training nodes run this many steps here; the harness runs the workflows as shipped


def with_short_training(workflow: dict) -> dict:
    """The workflow with its training nodes cut to SUITE_STEPS steps (the suite must stay fast on 2 cores)."""
    for node in workflow["nodes"]:
        if node["type"] in TRAINERS:
            names = [n for n in node_spec(node["type"])["widgets"] for n in ([n, None] if n == "seed" else [n])]
            i = names.index("steps")
            node["widgets_values"][i] = min(node["widgets_values"][i], SUITE_STEPS)
    return workflow


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_runs_on_the_tiny_model(path, tmp_path, monkeypatch):
    monkeypatch.setenv("R0_MODELS_DIR", str(tmp_path / "models"))  # a training workflow saves its LoRA there
    monkeypatch.setenv("R0_OUTPUT_DIR", str(tmp_path / "out"))
    shown = run_workflow(with_short_training(json.loads(path.read_text())))
    assert shown
    for images in shown:
        assert images.ndim == 4 and images.shape[-1] == 3 and images.dtype == torch.float32
        assert 0 <= images.min() and images.max() <= 1 and np.isfinite(images.numpy()).all()
        assert images.std() > 0.05, "a blank image is not a generated one"
