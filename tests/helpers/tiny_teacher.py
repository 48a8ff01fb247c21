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


# ----------------------------------------------------------------------------- teachers with other outputs
# (scripted to TorchScript files by tests/test_numbers.py; each holds a ``Tiny`` built by ``build``)

class Softmaxed(nn.Module):
    """Ends in a softmax: returns probabilities."""

    def __init__(self, tiny: Tiny):
        super().__init__()
        self.tiny = tiny

    def forward(self, x):
        return torch.softmax(self.tiny(x), dim=-1)


class NanOnImages(nn.Module):
    """NaN logits for every image that is not blank (a blank one, the driver's probe, gets its logits)."""

    def __init__(self, tiny: Tiny):
        super().__init__()
        self.tiny = tiny

    def forward(self, x):
        z = self.tiny(x)
        blank = x.flatten(1).std(dim=1, keepdim=True) == 0
        return torch.where(blank, z, torch.full_like(z, float("nan")))


class DictOut(nn.Module):
    """Returns {"logits": ..., "features": ...}, as Hugging Face models do."""

    def __init__(self, tiny: Tiny):
        super().__init__()
        self.tiny = tiny

    def forward(self, x) -> dict[str, torch.Tensor]:
        return {"features": x.mean((2, 3)), "logits": self.tiny(x)}


class StrOut(nn.Module):
    """Returns a string: no logits at all."""

    def __init__(self, tiny: Tiny):
        super().__init__()
        self.tiny = tiny

    def forward(self, x) -> str:
        return "not logits"
