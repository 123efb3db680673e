"""SimCLR / BYOL pretraining with lightly on eager PyTorch, for ssl_learning.py: an independent
implementation trained on the same npz, scored by the same k-NN.

  python benchmarks/torch_ssl_knn_reference.py OBJECTIVE NPZ STEPS [BATCH] [HIDDEN]

The network is `resnet_small`'s architecture (ImageNet stem of width 16, one basic block per
stage, 128 features) written in torch. The recipe is lightly's own examples' (SGD, lr 0.06,
momentum 0.9, weight decay 5e-4, cosine; BYOL's EMA momentum 0.99 to 1 on a cosine), with the
views of the repsim_jax run it is compared with: crops of 50-100 % of the area, no blur, colour
jitter 0.4 / 0.4 / 0.2 / 0.1; NT-Xent at temperature 0.2. Prints one JSON line: k-NN accuracy
(cosine, k 20, temperature 0.07, the train split voting for the val split) at random init and
after 1/4, 2/4, 3/4 and all of the steps.
"""

import copy
import json
import sys
import time

import numpy as np


def main():
  objective, path, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
  batch = int(sys.argv[4]) if len(sys.argv) > 4 else 64
  hidden = int(sys.argv[5]) if len(sys.argv) > 5 else 256
  import torch
  import torch.nn.functional as F
  from lightly.loss import NegativeCosineSimilarity, NTXentLoss
  from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, SimCLRProjectionHead
  from lightly.models.utils import update_momentum
  from lightly.transforms import (BYOLTransform, BYOLView1Transform, BYOLView2Transform,
                                  SimCLRTransform)
  from lightly.utils.scheduler import cosine_schedule
  from PIL import Image
  nn = torch.nn
  torch.manual_seed(0)

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
      self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
      self.short = (nn.Sequential() if stride == 1 and cin == cout else
                    nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                  nn.BatchNorm2d(cout)))

    def forward(self, x):
      return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.short(x))

  w = 16
  backbone = nn.Sequential(
      nn.Conv2d(3, w, 7, 2, 3, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
      Block(w, w, 1), Block(w, 2 * w, 2), Block(2 * w, 4 * w, 2), Block(4 * w, 8 * w, 2),
      nn.AdaptiveAvgPool2d(1), nn.Flatten())

  data = np.load(path)
  rgb = lambda a: np.repeat(a[..., None], 3, -1) if a.ndim == 3 else a  # noqa: E731 (grey -> RGB)
  train_x, val_x = rgb(data["train_images"]), rgb(data["val_images"])
  train_y, val_y = data["train_labels"].reshape(-1), data["val_labels"].reshape(-1)
  num_classes = int(max(train_y.max(), val_y.max())) + 1
  mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])

  def features(x):
    with torch.no_grad():
      return F.normalize(backbone(((torch.tensor(x).float() / 255 - mean) / std)
                                  .permute(0, 3, 1, 2)), dim=1).numpy()

  def knn(k=20, temperature=0.07):
    backbone.eval()
    bank, query = features(train_x), features(val_x)
    backbone.train()
    sims = query @ bank.T
    top = np.argsort(-sims, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sims, top, 1) / temperature)
    votes = np.zeros((len(query), num_classes))
    np.add.at(votes, (np.repeat(np.arange(len(query)), k), train_y[top].ravel()), weights.ravel())
    return float(np.mean(votes.argmax(1) == val_y))

  common = dict(input_size=train_x.shape[1], min_scale=0.5, gaussian_blur=0.0)
  if objective == "byol":
    transform = BYOLTransform(BYOLView1Transform(**common), BYOLView2Transform(**common))
    online = nn.Sequential(backbone, BYOLProjectionHead(128, hidden, 256))
    predictor = BYOLPredictionHead(256, hidden, 256)
    target = copy.deepcopy(online)
    for p in target.parameters():
      p.requires_grad = False
    criterion = NegativeCosineSimilarity()
    params = list(online.parameters()) + list(predictor.parameters())
  elif objective == "simclr":
    transform = SimCLRTransform(cj_bright=0.4, cj_contrast=0.4, cj_sat=0.2, cj_hue=0.1, **common)
    online = nn.Sequential(backbone, SimCLRProjectionHead(128, hidden, 128))
    criterion = NTXentLoss(temperature=0.2)
    params = list(online.parameters())
  else:
    raise SystemExit(f"objective: expected simclr or byol, got {objective!r}")
  opt = torch.optim.SGD(params, lr=0.06, momentum=0.9, weight_decay=5e-4)
  schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
  images = [Image.fromarray(a) for a in train_x]
  rng = np.random.default_rng(0)
  history, at_init, t0 = [], knn(), time.time()
  for step in range(steps):
    views = [transform(images[i]) for i in rng.choice(len(images), batch, replace=False)]
    x0, x1 = torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views])
    if objective == "byol":
      update_momentum(online, target, cosine_schedule(step, steps, 0.99, 1.0))
      with torch.no_grad():
        z0, z1 = target(x0), target(x1)
      loss = 0.5 * (criterion(predictor(online(x0)), z1) + criterion(predictor(online(x1)), z0))
    else:
      loss = criterion(online(x0), online(x1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    schedule.step()
    if (step + 1) % max(1, steps // 4) == 0:
      history.append(round(knn(), 3))
  print(json.dumps({"knn_at_init": round(at_init, 3), "knn": history[-1], "history": history,
                    "train_s": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
  main()
