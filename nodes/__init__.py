"""The ComfyUI adapters: the only part of the pack that may import ComfyUI. Each node family lives in its own
module; their mappings are merged here."""
from r0_core.cli import quiet_libraries

from . import native_nodes, native_refine, native_rpo, native_train, r0_nodes, reward_nodes, rpo_nodes, train_nodes

quiet_libraries()   # library notices the artist can do nothing about stay out of ComfyUI's console

NODE_CLASS_MAPPINGS: dict[str, type] = {**r0_nodes.NODE_CLASS_MAPPINGS, **reward_nodes.NODE_CLASS_MAPPINGS,
                                      **train_nodes.NODE_CLASS_MAPPINGS, **rpo_nodes.NODE_CLASS_MAPPINGS,
                                      **native_nodes.NODE_CLASS_MAPPINGS, **native_refine.NODE_CLASS_MAPPINGS,
                                      **native_train.NODE_CLASS_MAPPINGS, **native_rpo.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {**r0_nodes.NODE_DISPLAY_NAME_MAPPINGS,
                                                   **reward_nodes.NODE_DISPLAY_NAME_MAPPINGS,
                                                   **train_nodes.NODE_DISPLAY_NAME_MAPPINGS,
                                                   **rpo_nodes.NODE_DISPLAY_NAME_MAPPINGS,
                                                   **native_nodes.NODE_DISPLAY_NAME_MAPPINGS,
                                                   **native_refine.NODE_DISPLAY_NAME_MAPPINGS,
                                                   **native_train.NODE_DISPLAY_NAME_MAPPINGS,
                                                   **native_rpo.NODE_DISPLAY_NAME_MAPPINGS}
