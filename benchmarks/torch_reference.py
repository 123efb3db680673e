"""Plain PyTorch ResNet-18/50 (torchvision's layout) and ViT (timm's layout) for the step-time
comparison in train_step.py; written here so the benchmark needs only `torch`, not
torchvision/timm builds matching it.

  python benchmarks/torch_reference.py MODEL SIZE BATCH DEVICE

serves train_step.py from its own process: after warm-up it prints `ready`, then for each line
`N` on stdin runs N eager training steps and prints their times as a JSON list. A separate
process because PyTorch in the same process as XLA slowed XLA's CPU steps by up to 2x (its
OpenMP threads and allocations share the cores and the heap).
"""

import json
import sys
import time

import torch
from torch import nn


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.down = None
    if stride != 1 or cin != planes:
      self.down = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return torch.relu(y + (x if self.down is None else self.down(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, planes, stride):
    super().__init__()
    out = planes * 4
    self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out)
    self.down = None
    if stride != 1 or cin != out:
      self.down = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):

  def __init__(self, block, stages, num_classes):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                              nn.MaxPool2d(3, 2, 1))
    layers, cin = [], 64
    for i, n in enumerate(stages):
      for j in range(n):
        layers.append(block(cin, 64 * 2 ** i, 2 if (j == 0 and i > 0) else 1))
        cin = 64 * 2 ** i * block.expansion
    self.layers = nn.Sequential(*layers)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    return self.fc(self.layers(self.stem(x)).mean((2, 3)))


class ViT(nn.Module):

  def __init__(self, image_size, patch, width, depth, heads, mlp, num_classes):
    super().__init__()
    self.embed = nn.Conv2d(3, width, patch, patch)
    n = (image_size // patch) ** 2
    self.cls = nn.Parameter(torch.zeros(1, 1, width))
    self.pos = nn.Parameter(torch.zeros(1, n + 1, width))
    layer = nn.TransformerEncoderLayer(width, heads, mlp, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True, layer_norm_eps=1e-6)
    self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
    self.norm = nn.LayerNorm(width, eps=1e-6)
    self.head = nn.Linear(width, num_classes)

  def forward(self, x):
    x = self.embed(x).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
    return self.head(self.norm(self.blocks(x))[:, 0])


def make(name: str, size: int, num_classes: int = 10) -> nn.Module:
  if name == "resnet18":
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes)
  if name == "resnet50":
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes)
  vit = {"vit_ti16": (192, 12, 3, 768), "vit_s16": (384, 12, 6, 1536), "vit_b16": (768, 12, 12, 3072)}
  if name in vit:
    w, d, h, m = vit[name]
    return ViT(size, 16, w, d, h, m, num_classes)
  raise ValueError(f"no PyTorch reference for {name!r}")


def serve(name: str, size: int, batch: int, device: str):
  if device == "cuda" and not torch.cuda.is_available():
    sys.exit("torch_reference: this PyTorch build has no CUDA")
  try:
    net = make(name, size).to(device).train()
  except ValueError as e:
    sys.exit(f"torch_reference: {e}")
  if device == "cuda":
    # JAX's default float32 precision on NVIDIA GPUs lets convs and matmuls use TF32; match it.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
  opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  x = torch.randn(batch, 3, size, size, device=device)
  y = torch.randint(0, 10, (batch,), device=device)

  def step():
    t0 = time.perf_counter()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    if device == "cuda":
      torch.cuda.synchronize()
    return time.perf_counter() - t0

  for _ in range(3):  # warm-up (cuDNN autotuning on the GPU)
    step()
  print("ready", flush=True)
  for line in sys.stdin:
    print(json.dumps([step() for _ in range(int(line))]), flush=True)


if __name__ == "__main__":
  serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
