"""One arm of the T5-from-scratch experiment (experiment script, not part of the package).

    python .gpu/t5arm.py NAME PKG_ROOT T5 CLIP_DROP T5_DROP MIN1 MIN2 SCENES DEVICE OUT_ROOT [TEXT_LAYERS]

PKG_ROOT holds the mmdit_probe to train with (main, or main + t5.patch). The recipe is the shipped
model's: from scratch with the shipped VAE, batch 128, 2 CLIP layers (unless given), half the captions unplaced,
lr 1e-3 for MIN1 minutes, then lr 3e-4 for MIN2 minutes (the same run resumed: Adam state kept).
"""
import json
import sys
import tarfile
import time
import types
from pathlib import Path

name, pkg_root, t5, clip_drop, t5_drop, min1, min2, scenes, device, out_root = sys.argv[1:11]
text_layers = int(sys.argv[11]) if len(sys.argv) > 11 else 2
t5, scenes = bool(int(t5)), int(scenes)
clip_drop, t5_drop, min1, min2 = float(clip_drop), float(t5_drop), float(min1), float(min2)
# Skip the package __init__ (it imports nnsight); training needs none of it.
pkg = types.ModuleType("mmdit_probe")
pkg.__path__ = [str(Path(pkg_root) / "mmdit_probe")]
sys.modules["mmdit_probe"] = pkg

import torch  # noqa: E402

from mmdit_probe.toy import train as T  # noqa: E402

extra, kwargs = {}, {}
if t5:
    # One draw of shape (2, batch) compared with per-encoder rates: row 0 drops CLIP, row 1 drops T5.
    T.TEXT_ENCODER_DROPOUT = torch.tensor([[clip_drop], [t5_drop]])
    extra, kwargs = {"t5": True, "clip_dropout": clip_drop, "t5_dropout": t5_drop}, {"t5": True}
out = Path(out_root) / name
torch.set_num_threads(2)
t0 = time.time()
stages = []
for minutes, lr in ((min1, 1e-3), (min2, 3e-4)):
    T.train(out, minutes, 10**6, 0, scenes, 0, batch_size=128, lr=lr, text_layers=text_layers, unplaced=0.5,
            device=device, shipped_vae=True, **kwargs)
    step = torch.load(out / "diffusion.pt", weights_only=False, map_location="cpu")["step"]
    stages.append({"to_step": step, "lr": lr, "minutes": minutes})
info = {"name": name, "steps": stages[-1]["to_step"], "stages": stages, "batch": 128, "seconds": time.time() - t0,
        "start": "scratch, with the shipped VAE", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        **extra}
print(json.dumps(info), flush=True)
T.export(out, 0, target=out / "export")
exported = out / "export" / "training.json"
exported.write_text(json.dumps({**json.loads(exported.read_text()), **info}))
with tarfile.open(Path(out_root) / f"{name}.tgz", "w:gz") as tar:
    tar.add(out / "export", arcname=name)
