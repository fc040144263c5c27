"""Tutorial parity: the PyTorch tutorial's loop as published vs `cifarctl train` with defaults.

Runs (a) and (b) alternately, a, b, a, b, ..., one seed per pair, each end to end as its own
process (imports, data loading, 2 epochs, test accuracy), and prints both mean wall times,
their ratio and both mean accuracies.

    python benchmarks/tutorial_parity.py --source ../shared/datasets/cifar10-jpeg.tar.gz --seeds 3

(a) needs the images as files: it reads them with torchvision's ImageFolder from a folder it
unpacks once from --source. (b) reads the cifarctl cache, imported once from the same source
with `cifarctl download --source` (not timed: it happens once per machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import import_dataset

from cifarctl.archive import safe_extract

TUTORIAL = r'''
import sys, torch, torchvision, torchvision.transforms as transforms
import torch.nn as nn, torch.nn.functional as F, torch.optim as optim
root, seed = sys.argv[1], int(sys.argv[2])
torch.manual_seed(seed)
transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
trainset = torchvision.datasets.ImageFolder(root + "/train", transform=transform)
trainloader = torch.utils.data.DataLoader(trainset, batch_size=4, shuffle=True, num_workers=2)
testset = torchvision.datasets.ImageFolder(root + "/test", transform=transform)
testloader = torch.utils.data.DataLoader(testset, batch_size=4, shuffle=False, num_workers=2)

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)

net = Net()
criterion = nn.CrossEntropyLoss()
optimizer = optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
for epoch in range(2):
    running_loss = 0.0
    for i, data in enumerate(trainloader, 0):
        inputs, labels = data
        optimizer.zero_grad()
        outputs = net(inputs)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
        if i % 2000 == 1999:
            print(f"[{epoch + 1}, {i + 1:5d}] loss: {running_loss / 2000:.3f}")
            running_loss = 0.0
correct = total = 0
with torch.no_grad():
    for images, labels in testloader:
        outputs = net(images)
        _, predicted = torch.max(outputs.data, 1)
        total += labels.size(0)
        correct += (predicted == labels).sum().item()
print("ACCURACY", correct / total)
'''


def run_tutorial(folder: Path, seed: int) -> tuple[float, float]:
    """Wall time and test accuracy of the tutorial's script as one process."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", TUTORIAL, str(folder), str(seed)], check=True,
                         capture_output=True, text=True).stdout
    wall = time.perf_counter() - t
    return wall, float(out.split("ACCURACY")[-1])


def run_cifarctl(data_dir: Path, run_dir: Path, seed: int, extra: list[str]) -> tuple[float, float]:
    """Wall time and final test accuracy of `cifarctl train` with its defaults, as one process."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "cifarctl", "train", "--data-dir", str(data_dir), "--seed", str(seed),
                          "-o", str(run_dir), "--json", *extra], check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t
    return wall, json.loads(out)["test_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="image-folder archive or folder (train/<class>, test/<class>)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cifarctl-parity")
    parser.add_argument("--cifarctl-args", default="", help="extra arguments for (b), e.g. '--device cuda'")
    args = parser.parse_args()

    work = args.work
    data_dir = import_dataset(args.source, work)
    folder = Path(args.source)
    if not folder.is_dir():
        folder = work / "images"
        if not folder.exists():
            safe_extract(Path(args.source), folder)
        train = next(folder.rglob("train"))
        folder = train.parent

    results: dict[str, list[tuple[float, float]]] = {"a": [], "b": []}
    for seed in range(args.seeds):
        results["a"].append(run_tutorial(folder, seed))
        print(f"seed {seed} (a) tutorial: {results['a'][-1][0]:6.1f} s  {100 * results['a'][-1][1]:.2f}%", flush=True)
        results["b"].append(run_cifarctl(data_dir, work / f"run-{seed}", seed, args.cifarctl_args.split()))
        print(f"seed {seed} (b) cifarctl: {results['b'][-1][0]:6.1f} s  {100 * results['b'][-1][1]:.2f}%", flush=True)

    wall = {k: statistics.mean(w for w, _ in v) for k, v in results.items()}
    acc = {k: statistics.mean(a for _, a in v) for k, v in results.items()}
    print(f"(a) tutorial loop : mean wall {wall['a']:6.1f} s, mean test accuracy {100 * acc['a']:.2f}%")
    print(f"(b) cifarctl train: mean wall {wall['b']:6.1f} s, mean test accuracy {100 * acc['b']:.2f}%")
    print(f"speed-up (a)/(b)  : {wall['a'] / wall['b']:.2f}x; accuracy difference (b)-(a): "
          f"{100 * (acc['b'] - acc['a']):+.2f} points")


if __name__ == "__main__":
    main()
