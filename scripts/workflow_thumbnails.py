"""Render each workflow in workflows/ headless on the tiny model, as shipped (training nodes run all their
steps), and save its first shown images as the same-name .jpg thumbnail ComfyUI's template browser shows:
`python scripts/workflow_thumbnails.py [name.json ...]` (default: every workflow). Trained LoRAs and saved images
go to a temporary folder unless R0_MODELS_DIR / R0_OUTPUT_DIR say otherwise."""
import json
import os
import pathlib
import sys
import tempfile

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nodes.headless import run_workflow  # noqa: E402
from r0_core.tiny.evaluate import grid  # noqa: E402

scratch = tempfile.mkdtemp(prefix="thumbnails-")
os.environ.setdefault("R0_MODELS_DIR", os.path.join(scratch, "models"))
os.environ.setdefault("R0_OUTPUT_DIR", os.path.join(scratch, "output"))
names = sys.argv[1:]
for path in sorted((ROOT / "workflows").glob("*.json")):
    if names and path.name not in names:
        continue
    images = run_workflow(json.loads(path.read_text()))[0].numpy()
    columns = int(np.ceil(np.sqrt(len(images))))
    scale = max(1, 256 // (images.shape[2] * columns))
    Image.fromarray(grid(images, columns, scale)).convert("RGB").save(path.with_suffix(".jpg"), quality=92)
    print(f"wrote {path.with_suffix('.jpg').relative_to(ROOT)}")
