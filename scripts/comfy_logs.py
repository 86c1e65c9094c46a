"""What the scripts run inside ComfyUI share: a log handler that keeps ComfyUI's warnings (a LoRA's "lora key
not loaded" / "NOT LOADED" lines) for the scripts to count."""
import logging


class Messages(logging.Handler):
    """ComfyUI's warnings while it is attached, as text lines."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())
