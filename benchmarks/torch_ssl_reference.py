"""SimCLR / BYOL in eager PyTorch with lightly (heads, losses, transforms), for ssl_step.py.

  python benchmarks/torch_ssl_reference.py OBJECTIVE MODEL SIZE BATCH [DEVICE] [PART]

Serves ssl_step.py from its own process: prints `ready` after warm-up, then for each line `N`
on stdin runs N steps and prints their times as a JSON list. A step (PART `step`) is what a
lightly training loop does per batch in one process: the two views of every example by lightly's
transforms (PIL on the host, one image at a time, as its data loaders), the forward of both views
(BYOL: and of the momentum network), the loss, backward and an SGD step (BYOL: and the EMA
update), on DEVICE (`cpu` or `cuda`). PART `model` makes the views once and times the rest: the
step as it would be with enough loader workers to hide the transforms entirely.
"""

import copy
import json
import sys
import time

import numpy as np


def main():
  objective, model_name, size, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
  device = sys.argv[5] if len(sys.argv) > 5 else "cpu"
  part = sys.argv[6] if len(sys.argv) > 6 else "step"
  try:
    import torch
    import torchvision
    from lightly.loss import NegativeCosineSimilarity, NTXentLoss
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, SimCLRProjectionHead
    from lightly.models.utils import update_momentum
    from lightly.transforms import (BYOLTransform, BYOLView1Transform, BYOLView2Transform,
                                    SimCLRTransform)
    from PIL import Image
  except ImportError as e:
    print(f"torch_ssl_reference: {e}; skipping the PyTorch comparison", file=sys.stderr)
    print("skip", flush=True)
    return
  torch.set_num_threads(int(torch.get_num_threads()))
  backbone = getattr(torchvision.models, model_name)()
  dim = backbone.fc.in_features
  backbone.fc = torch.nn.Identity()
  images = [Image.fromarray(a) for a in
            np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)]
  if objective == "simclr":
    transform = SimCLRTransform(input_size=size)
    head = SimCLRProjectionHead(dim, 2048, 128)
    loss_fn = NTXentLoss(temperature=0.1)
    online = torch.nn.Sequential(backbone, head)
    params = list(online.parameters())
  else:
    transform = BYOLTransform(BYOLView1Transform(input_size=size),
                              BYOLView2Transform(input_size=size))
    head = BYOLProjectionHead(dim, 4096, 256)
    predictor = BYOLPredictionHead(256, 4096, 256)
    online = torch.nn.Sequential(backbone, head)
    target = copy.deepcopy(online)
    for p in target.parameters():
      p.requires_grad = False
    loss_fn = NegativeCosineSimilarity()
    params = list(online.parameters()) + list(predictor.parameters())
  for m in (online, predictor, target) if objective == "byol" else (online,):
    m.to(device)
  opt = torch.optim.SGD(params, lr=0.06, momentum=0.9)

  def make_views():
    views = [transform(im) for im in images]
    return (torch.stack([v[0] for v in views]).to(device),
            torch.stack([v[1] for v in views]).to(device))

  fixed = make_views() if part == "model" else None

  def step():
    t0 = time.perf_counter()
    x0, x1 = fixed or make_views()
    if objective == "simclr":
      loss = loss_fn(online(x0), online(x1))
    else:
      p0, p1 = predictor(online(x0)), predictor(online(x1))
      with torch.no_grad():
        z0, z1 = target(x0), target(x1)
      loss = 0.5 * (loss_fn(p0, z1) + loss_fn(p1, z0))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if objective == "byol":
      update_momentum(online, target, 0.99)
    if device == "cuda":
      torch.cuda.synchronize()
    return time.perf_counter() - t0

  for _ in range(2):
    step()
  print("ready", flush=True)
  for line in sys.stdin:
    print(json.dumps([step() for _ in range(int(line))]), flush=True)


if __name__ == "__main__":
  main()
