"""Your own training loop on a distill cache: DistillDataset + DistillLoader + SoftTargetLoss, with a resume.

    distill demo                      # writes out/demo/cache (once)
    python examples/own_loop.py       # stop it at any point (Ctrl-C, preemption) and run it again: it goes on
"""
import argparse
import os

import torch

import distill

p = argparse.ArgumentParser()
p.add_argument("--shards", default="shards/demo/train")
p.add_argument("--cache", default="out/demo/cache")
p.add_argument("--out", default="out/own_loop.pt", help="checkpoint: model, optimiser, loader state")
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--stop-after", type=int, default=0, help="stop after this many steps (to try the resume)")
args = p.parse_args()

ds = distill.DistillDataset(args.shards, args.cache, image_size=32, batch_size=args.batch_size, seed=0)
loader = distill.DistillLoader(ds, num_workers=2)
loss_fn = distill.SoftTargetLoss(ds.num_classes, temperature=ds.temperature)
try:                                  # any model: a timm one when timm is installed, else a small CNN
    import timm
    model = timm.create_model("resnet10t", num_classes=ds.num_classes)
except ImportError:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, 2, 1),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(64, ds.num_classes))
opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
step, epoch = 0, 0


def save():                           # write then rename: a kill never leaves half a checkpoint
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "loader": loader.state_dict(), "step": step},
               args.out + ".tmp")
    os.replace(args.out + ".tmp", args.out)


if os.path.exists(args.out):
    ck = torch.load(args.out, weights_only=False)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    loader.load_state_dict(ck["loader"])      # the rest of the epoch it was in, each sample once
    step, epoch = ck["step"], ck["loader"]["epoch"]
    print(f"resumed at epoch {epoch + 1}, step {step}")
for epoch in range(epoch, args.epochs):
    ds.set_epoch(epoch)
    for batch in loader:
        loss = loss_fn(model(batch["image"]), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 10 == 0 or step == args.stop_after:
            save()
        if step == args.stop_after:
            raise SystemExit(f"stopped after step {step}")
    print(f"epoch {epoch + 1} done at step {step}")
save()
print(f"done: {step} steps")
