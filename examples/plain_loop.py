"""Class selectivity in your own training loop: a torchvision ResNet-18 on the digits data.

    python examples/plain_loop.py [--steps 40] [--alpha -1.0]

Nothing here is specific to this package's trainer: a hand-written loop, a torchvision model, the
tracker measuring every residual block's output and the regularizer's term added to the loss.
"""
import argparse

import torch
import torch.nn.functional as F
import torchvision

import selectivity
from selectivity.train.config import Config, data_spec
from selectivity.pipelines import build_loader

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--steps", type=int, default=40)
p.add_argument("--alpha", type=float, default=-1.0, help="regularizer α (< 0: less selectivity)")
args = p.parse_args()
torch.manual_seed(0)

data = Config(dataset="digits", batch_size=64, eval_batch_size=360)  # only its data fields are read
train, val = build_loader(data_spec(data), "train", "cpu"), build_loader(data_spec(data), "val", "cpu")
model = torchvision.models.resnet18(num_classes=10).to(memory_format=torch.channels_last)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
reg = selectivity.SelectivityRegularizer(model, num_classes=10)
tracker = selectivity.SelectivityTracker(model, num_classes=10, dataset_labels=val.labels,
                                         null_permutations=10)
step = 0
while step < args.steps:
    train.set_epoch(step // len(train))
    for images, labels in train:
        reg.enabled, tracker.enabled = True, False
        loss = F.cross_entropy(model(images), labels) - args.alpha * reg.term(labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step == args.steps:
            break

# Measure the network being trained: BatchNorm statistics recomputed on training images (the
# running averages lag the weights early in training), restored when the block ends.
reg.enabled, tracker.enabled = False, True
calibration = [images for _, (images, _) in zip(range(8), train)]
with torch.no_grad(), selectivity.bn_statistics(model, "recalibrate", calibration):
    for batch in val:  # a batch unpacks as (images, labels) and carries its dataset indices
        images, labels = batch
        with tracker.track(labels, indices=batch.indices):
            model(images)
for layer, r in tracker.compute().items():
    print(f"{layer:10s} SI {r.mean:.3f}   null {r.null_mean:.3f} (95% {r.null_q95:.3f})   "
          f"units above their null: {r.frac_above_null:.0%}")
