"""Run a UI-format workflow of this pack without a ComfyUI server: our nodes execute for real, and the core
image sinks (PreviewImage, SaveImage) collect their images. Used by the tests and to render thumbnails."""
from __future__ import annotations

import torch

from . import NODE_CLASS_MAPPINGS

# ComfyUI core nodes our workflows use, with their inputs as ComfyUI declares them
CORE_NODES = {
    "PreviewImage": {"inputs": {"images": "IMAGE"}, "widgets": [], "outputs": []},
    "SaveImage": {"inputs": {"images": "IMAGE", "filename_prefix": "STRING"}, "widgets": ["filename_prefix"],
                  "outputs": []},
}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


def node_spec(node_type: str) -> dict:
    """A node's input types, widget names (in order), output types, combo choices and widget options."""
    if node_type in CORE_NODES:
        return CORE_NODES[node_type]
    cls = NODE_CLASS_MAPPINGS[node_type]
    inputs = {**cls.INPUT_TYPES()["required"], **cls.INPUT_TYPES().get("optional", {})}
    types = {name: ("COMBO" if isinstance(spec[0], list) else spec[0]) for name, spec in inputs.items()}
    widgets = [name for name, t in types.items() if t in WIDGET_TYPES or t == "COMBO"]
    return {"inputs": types, "widgets": widgets, "outputs": list(cls.RETURN_TYPES),
            "optional": set(cls.INPUT_TYPES().get("optional", {})), "choices": {
        name: spec[0] for name, spec in inputs.items() if isinstance(spec[0], list)}, "options": {
        name: spec[1] if len(spec) > 1 else {} for name, spec in inputs.items()}}


def widget_values(node: dict, spec: dict) -> dict:
    """Widget name -> value, skipping the control_after_generate value ComfyUI stores after a seed."""
    values, out = list(node["widgets_values"]), {}
    for name in spec["widgets"]:
        if not values and name in spec.get("optional", ()):
            break   # a workflow saved before this optional input was appended: the node's default, as in ComfyUI
        if not values:
            raise ValueError(f"node {node['id']} ({node['type']}) has too few widget values: {name} is missing")
        out[name] = values.pop(0)
        if name in ("seed", "noise_seed") and values.pop(0) not in ("fixed", "increment", "decrement",
                                                                     "randomize"):
            raise ValueError(f"node {node['id']} ({node['type']}): expected a control_after_generate value")
    if values:
        raise ValueError(f"node {node['id']} ({node['type']}) has extra widget values {values}")
    return out


def run_workflow(workflow: dict) -> list:
    """Execute a UI workflow headless: our nodes run for real; Preview/Save collect their images."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    results, shown = {}, []
    for node in sorted(nodes.values(), key=lambda n: n["order"]):
        spec = node_spec(node["type"])
        kwargs = widget_values(node, spec)
        for slot in node["inputs"]:
            _, src, src_slot, *_ = links[slot["link"]]
            kwargs[slot["name"]] = results[src][src_slot]
        if node["type"] in CORE_NODES:
            shown.append(kwargs["images"])
            continue
        cls = NODE_CLASS_MAPPINGS[node["type"]]
        with torch.inference_mode():  # as ComfyUI runs every node
            out = getattr(cls(), cls.FUNCTION)(**kwargs)
            results[node["id"]] = out["result"] if isinstance(out, dict) else out  # output nodes add a "ui" part
    return shown


