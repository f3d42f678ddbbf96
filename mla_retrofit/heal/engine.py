"""Where training runs: Hugging Face Accelerate when installed (one process, DDP or FSDP under
``accelerate launch``), otherwise plain PyTorch in one process.

The recipe talks only to :class:`Engine`; nothing here knows about healing.
bf16 autocast is used on CUDA only; CPU runs in float32.
"""

from __future__ import annotations

import contextlib
import importlib.util
import random

import torch
from torch import nn

from ..errors import UserError


def make_engine(kind: str = "auto") -> Engine:
    has_accelerate = importlib.util.find_spec("accelerate") is not None
    if kind == "accelerate" and not has_accelerate:
        raise UserError("engine 'accelerate' needs the accelerate package; run: pip install accelerate")
    if kind == "torch" or not has_accelerate:
        return Engine()
    return AccelerateEngine()


class Engine:
    """One process, plain PyTorch."""

    sharded = False

    def __init__(self) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.num_processes, self.process_index = 1, 0

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    def prepare(self, module: nn.Module, optimizer, loader):
        return module.to(self.device), optimizer, loader

    def to_device(self, batch):
        return [t.to(self.device, non_blocking=True) for t in batch]

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self, module: nn.Module):
        return contextlib.nullcontext()

    def clip(self, params: list[nn.Parameter], max_norm: float) -> float:
        if max_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))

    def mean(self, value: torch.Tensor) -> float:
        return float(value)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over processes (a copy on this process's device)."""
        return value.detach().to(self.device, torch.float32).clone()

    def wait(self) -> None:
        pass

    def release(self) -> None:
        pass

    def model_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The full state dict on the CPU (every process holds it)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    def optimizer_state(self, module: nn.Module, optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state(self, module: nn.Module, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)


class AccelerateEngine(Engine):
    """Accelerate's ``Accelerator``: device placement, DDP/FSDP wrapping, data sharding, mixed precision."""

    def __init__(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        cuda = torch.cuda.is_available()
        self.acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
        self.device = self.acc.device
        self.num_processes, self.process_index = self.acc.num_processes, self.acc.process_index
        self.sharded = self.acc.distributed_type == DistributedType.FSDP

    def prepare(self, module: nn.Module, optimizer, loader):
        return self.acc.prepare(module, optimizer, loader)

    def autocast(self):
        return self.acc.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def no_sync(self, module: nn.Module):
        return self.acc.no_sync(module)

    def clip(self, params: list[nn.Parameter], max_norm: float) -> float:
        return float(self.acc.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))

    def mean(self, value: torch.Tensor) -> float:
        return float(self.acc.reduce(value.detach().to(self.device, torch.float32), "mean"))

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(value.detach().to(self.device, torch.float32).clone(), "sum")

    def wait(self) -> None:
        self.acc.wait_for_everyone()

    def release(self) -> None:
        self.acc.free_memory()

    def model_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        state = self.acc.get_state_dict(module, unwrap=True)
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def optimizer_state(self, module: nn.Module, optimizer) -> dict:
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(module, optimizer.optimizer, options=opts)

    def load_optimizer_state(self, module: nn.Module, optimizer, state: dict) -> None:
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer.optimizer, state, options=StateDictOptions(full_state_dict=True))


def rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
