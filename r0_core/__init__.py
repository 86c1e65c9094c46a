"""r0_core: few-step text-to-image generation and reward machinery, standalone (never imports ComfyUI)."""
from .loading import TINY, ModelLoadError, load_pipeline, pick_device_dtype

__all__ = ["TINY", "ModelLoadError", "load_pipeline", "pick_device_dtype"]
