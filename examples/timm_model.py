"""Class selectivity of a timm ResNet (no pretrained weights: nothing is downloaded).

    python examples/timm_model.py [--model resnet26d] [--images 256]

The ``blocks`` preset finds timm's residual blocks as it finds torchvision's; the SI here is of
an untrained network on random images with random labels, so it should sit at its null.
"""
import argparse

import timm
import torch

import selectivity

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--model", default="resnet26d")
p.add_argument("--images", type=int, default=256)
args = p.parse_args()
torch.manual_seed(0)

model = timm.create_model(args.model, pretrained=False, num_classes=10).eval()
labels = torch.randint(0, 10, (args.images,))
tracker = selectivity.SelectivityTracker(model, num_classes=10, dataset_labels=labels,
                                         null_permutations=10)
with torch.no_grad():
    for i in range(0, args.images, 64):
        idx = torch.arange(i, min(i + 64, args.images))
        with tracker.track(labels[idx], idx):
            model(torch.randn(len(idx), 3, 64, 64))
results = tracker.compute()
print(f"{args.model}: {len(results)} residual blocks, "
      f"{sum(r.si.numel() for r in results.values())} units")
for layer, r in results.items():
    print(f"{layer:10s} SI {r.mean:.3f}   null {r.null_mean:.3f} (95% {r.null_q95:.3f})")
