"""The device and dtype a benchmark run uses (`run.py --device --dtype`), set once as torch's defaults so that every
suite builds its models and tensors there; and the synchronisation that timing needs on an accelerator."""

import platform
import resource

import torch


def use(device: str, dtype: str) -> None:
    torch.set_default_device(device)
    torch.set_default_dtype(getattr(torch, dtype))


def defaults() -> dict:
    """`{"device", "dtype"}` as `use` takes them, to start another process on the same ones."""
    return {"device": str(torch.get_default_device()), "dtype": str(torch.get_default_dtype()).removeprefix("torch.")}


def synchronize() -> None:
    """Wait for the accelerator's queued work, so that a wall-clock time covers it (nothing to wait for on CPU)."""
    if torch.get_default_device().type == "cuda":
        torch.cuda.synchronize()


def generator(seed: int) -> torch.Generator:
    """A seeded generator on the default device (sampling on CUDA takes a CUDA generator)."""
    return torch.Generator(device=torch.get_default_device()).manual_seed(seed)


def describe() -> dict:
    device = torch.get_default_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": str(device), "device_name": name, "dtype": str(torch.get_default_dtype())}


def memory_mib() -> float:
    """Memory in use: the accelerator's allocated memory, or on CPU the process's resident set size."""
    if torch.get_default_device().type == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak_memory() -> None:
    """Start a new peak at the memory in use now."""
    if torch.get_default_device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets the kernel's high-water mark VmHWM to the current resident set size


def peak_memory_mib() -> float:
    """The peak of `memory_mib()` since the last `reset_peak_memory()` (on CPU: VmHWM)."""
    if torch.get_default_device().type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 2**10


def step_memory_mib(step, steps: int) -> tuple[float, float]:
    """`(memory in use now, its peak over `steps` calls of `step`)`, in MiB: a built model, then its training steps."""
    built = memory_mib()
    reset_peak_memory()
    for _ in range(steps):
        step()
    return built, peak_memory_mib()
