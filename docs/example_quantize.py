"""Quantize a timm model with HNQ, export it and check the export bit for bit.

Run from the repository root: .venv/bin/python docs/example_quantize.py
Pass a local checkpoint to create_float_model(..., pretrained="deit_tiny.pth") for real
accuracy; without one the weights are random, which is enough to show the integer path.
"""

from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image

import hnq

float_model, arch = hnq.create_float_model("deit_tiny_patch16_224")
plan = hnq.default_plan(float_model, act_bits=8)  # or hnq.search_plan(checkpoint, calib_dir)
qmodel = hnq.quantize(float_model, plan)

photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
pixels = torch.from_numpy(np.stack([np.asarray(Image.fromarray(p).resize((224, 224))) for p in photos]))
pixels = pixels.permute(0, 3, 1, 2).contiguous()  # uint8 [N, 3, 224, 224]: the model normalizes itself

hnq.calibrate(qmodel, [pixels], 1)
qmodel.eval()
Path("runs").mkdir(exist_ok=True)
hnq.export_onnx(qmodel, plan, "runs/deit_tiny_int8.onnx", {})
print(hnq.check_bit_exact("runs/deit_tiny_int8.onnx", qmodel, pixels))
