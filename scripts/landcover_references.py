"""Reference points for the land-cover evaluation that do not come from any pretrained encoder:
hand-made colour and texture statistics (kNN and probe, as for a model's embeddings) and a small
CNN trained *supervised* on the training folds' labels. Same chips (the unseen area) and the same
spatial cross-validation folds as ``landcover_table(model, folds=6)``; they tell how far these
labels let any feature go, not how good a model is.

    python scripts/landcover_references.py [--folds 6] [--epochs 40]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from xstars_models.evaluation import landcover_scores, load_landcover_chips, spatial_folds


def colour_statistics(chips: torch.Tensor) -> torch.Tensor:
    """Per band: mean, standard deviation and the 10th / 50th / 90th percentiles (N x 15 for RGB)."""
    x = chips.double()
    levels = torch.tensor([0.1, 0.5, 0.9], dtype=x.dtype)
    quantiles = torch.quantile(x.flatten(2), levels, dim=2).permute(1, 0, 2).flatten(1)
    return torch.cat([x.mean((2, 3)), x.std((2, 3)), quantiles], 1)


def texture_statistics(chips: torch.Tensor) -> torch.Tensor:
    """Of the grey-level image: mean absolute gradient along x and y, and at 1, 2, 4 and 8 px
    cells the mean absolute difference of a 2 x 2 block mean from its corner pixel and the mean
    and spread of the 2 x 2 local standard deviation (N x 14)."""
    grey = chips.double().mean(1, keepdim=True)
    columns = [
        (grey[..., :, 1:] - grey[..., :, :-1]).abs().mean((1, 2, 3)),
        (grey[..., 1:, :] - grey[..., :-1, :]).abs().mean((1, 2, 3)),
    ]
    for cell in (1, 2, 4, 8):
        level = F.avg_pool2d(grey, cell) if cell > 1 else grey
        block_mean = F.avg_pool2d(level, 2)
        columns.append((block_mean - level[..., ::2, ::2]).abs().mean((1, 2, 3)))
        local_std = (F.avg_pool2d(level**2, 2) - block_mean**2).clamp_min(0).sqrt()
        columns += [local_std.mean((1, 2, 3)), local_std.std((1, 2, 3))]
    return torch.stack(columns, 1)


def small_cnn(classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Dropout(0.3), nn.Linear(64, classes),
    )


def supervised_accuracy(chips, folds: int, epochs: int) -> float:
    """Cross-validated accuracy of :func:`small_cnn` trained from scratch on each training side
    (AdamW, batch 32, random flips and quarter turns), seeded per fold."""
    x = chips.chips.float() / 255
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    labels = chips.labels
    fold_of = spatial_folds(chips.blocks, folds, 0)
    predicted = torch.empty_like(labels)
    for fold in range(folds):
        torch.manual_seed(fold)
        train, test = fold_of != fold, fold_of == fold
        train_x, train_y = x[train], labels[train]
        net = small_cnn(len(chips.class_names))
        optimiser = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-2)
        for _ in range(epochs):
            net.train()
            for index in torch.randperm(len(train_x)).split(32):
                batch = train_x[index]
                for dim in (-1, -2):
                    if torch.rand(()) < 0.5:
                        batch = batch.flip(dim)
                batch = torch.rot90(batch, int(torch.randint(4, ())), (-2, -1))
                loss = F.cross_entropy(net(batch), train_y[index])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        net.eval()
        with torch.no_grad():
            predicted[test] = net(x[test]).argmax(1)
    return float((predicted == labels).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    chips = load_landcover_chips()
    colour = colour_statistics(chips.chips)
    print("| features | dims | kNN | probe |\n|---|---|---|---|")
    for name, features in (("colour statistics", colour), ("colour + texture statistics",
                                                             torch.cat([colour, texture_statistics(chips.chips)], 1))):
        scores = landcover_scores(features, chips, folds=args.folds)
        print(f"| {name} | {features.shape[1]} | {scores['knn']['acc']:.3f} | {scores['probe']['acc']:.3f} |")
    print(f"| small CNN, supervised ({args.epochs} epochs) | - | {supervised_accuracy(chips, args.folds, args.epochs):.3f} | - |")


if __name__ == "__main__":
    main()
