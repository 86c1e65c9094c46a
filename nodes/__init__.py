"""The ComfyUI adapters: the only part of the pack that may import ComfyUI. Node families arrive with the
issues that build them (sampler, rewards, R0 training, RPO); their mappings are merged here."""
NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
