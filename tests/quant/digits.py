"""A small CNN trained on scikit-learn's bundled digits (8x8 images), exported to ONNX: a real trained
model for the int8 accuracy tests, built in a few seconds."""
from __future__ import annotations

import numpy as np


def load_digits_split(seed: int = 0):
    """(train, calibration, validation) image/label arrays; images float32 [N, 1, 8, 8] scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    images, labels = images[order], labels[order]
    return (images[:1100], labels[:1100]), (images[1100:1300], labels[1100:1300]), (images[1300:], labels[1300:])


def train_cnn(images: np.ndarray, labels: np.ndarray, epochs: int = 10, seed: int = 0):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: threads only contend with the other test workers
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    torch.set_num_threads(threads)
    return model.eval()


def export(model, path) -> None:
    import torch

    example = torch.zeros(1, 1, 8, 8)
    torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)


def batches(images: np.ndarray, size: int = 50) -> list[dict[str, np.ndarray]]:
    return [{"image": images[i:i + size]} for i in range(0, len(images), size)]


def top1(engine, images: np.ndarray, labels: np.ndarray) -> float:
    logits = np.concatenate([engine.run(feed)["logits"] for feed in batches(images)])
    return float(100.0 * np.mean(logits.argmax(-1) == labels))


def config(**options):
    """A BuilderConfig for the digits model: batches of 1 to 64 images."""
    import kiln

    return kiln.BuilderConfig(profiles=[{"image": ((1, 1, 8, 8), (50, 1, 8, 8), (64, 1, 8, 8))}], **options)
