"""Train a (poisoned) model on the first N Fashion-MNIST training images, for CPU repros of GPU findings
(docs/method.md, Finding 6).

    python scripts/train_subset.py ATTACK_SPEC OUT.safetensors N EPOCHS [ARCH]   # e.g. badnets:target=5 ... 12000 2

ACC/ASR of the saved model are measured on the first 2,000 test images (printed, and kept in its sidecar).
"""
import dataclasses
import sys
import time

import torch

from ulrl.attacks import build_attack
from ulrl.checkpoints import save_checkpoint
from ulrl.data import load_dataset
from ulrl.pipeline import train_model
from ulrl.train import TrainConfig

torch.manual_seed(0)
spec, out, n, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
arch = sys.argv[5] if len(sys.argv) > 5 else "preact-resnet18"
data = load_dataset("fashion-mnist")
data = dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n], test_x=data.test_x[:2000],
                           test_y=data.test_y[:2000])
attack = build_attack(spec, data.num_classes) if spec != "none" else None
t0 = time.time()
model, meta = train_model(data, arch, attack, TrainConfig(epochs=epochs, lr=0.01, batch_size=128, hflip=True, seed=0),
                          progress=False)
print(meta["test_metrics"], f"{time.time() - t0:.0f} s", flush=True)
save_checkpoint(out, model, meta, attack.state_tensors() if attack else None)
