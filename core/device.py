"""The one device resolver: what ``--device auto|cpu|cuda|cuda:N`` means for every model stage.

``auto`` is the first GPU when torch sees one, else the CPU. Asking for CUDA on a machine without
it is a clear error at start-up, not a failure deep inside the first batch. torch is imported
lazily, so the core layer stays light for callers that only decode media.
"""
from __future__ import annotations


class DeviceUnavailable(RuntimeError):
    """The requested device does not exist on this machine."""


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(preference: object = "auto", what: str = "--device") -> str:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` for ``preference`` (a string, a ``torch.device`` or None = auto).

    ``what`` names the option in the error (e.g. ``--clap-device``).
    """
    name = "auto" if preference is None else str(preference)
    if name == "auto":
        return "cuda" if _cuda_available() else "cpu"
    if name.startswith("cuda"):
        if not _cuda_available():
            raise DeviceUnavailable(f"{what} {name} was asked for, but CUDA is not available here")
        import torch

        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise DeviceUnavailable(f"{what} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return name
    if name != "cpu":
        import torch

        try:
            torch.device(name)
        except RuntimeError as e:
            raise DeviceUnavailable(f"{what} {name}: not a device name (use auto, cpu, cuda or cuda:N)") from e
    return name


def torch_device(preference: object = "auto", what: str = "--device"):
    """``resolve_device`` as a ``torch.device``."""
    import torch

    return torch.device(resolve_device(preference, what))


def wants_gpu(preference: object = "auto") -> bool:
    """Whether a stage with this device preference should ask its engine for a GPU."""
    name = "auto" if preference is None else str(preference)
    return name.startswith("cuda") or (name == "auto" and _cuda_available())
