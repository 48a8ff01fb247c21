"""A small teacher for the `module.path:callable` spec form (tests put tests/ on sys.path)."""
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def build() -> nn.Module:
    torch.manual_seed(0)
    return Tiny()


def not_a_module():
    return 42


class ExecutorProbe(Tiny):
    """Records whether TorchScript's graph executor optimises, as a scripted member would run, per call."""

    def __init__(self):
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(torch._C._get_graph_executor_optimize())
        return super().forward(x)


def executor_probe() -> nn.Module:
    torch.manual_seed(0)
    return ExecutorProbe()
