"""Typed errors shared by every part of ukgpu.

Each error's message says what went wrong *and* what to do about it.
"""


class UkgpuError(Exception):
    """Base class: anything ukgpu raises on purpose."""


class ContextOverflowError(UkgpuError):
    """More tokens than the KV cache holds."""


class GGUFError(UkgpuError):
    """A GGUF file is corrupt, truncated or uses something we do not support."""


class TokenizerError(UkgpuError):
    """The vocabulary in a GGUF file cannot be used."""


class ModelNotFoundError(UkgpuError):
    """A model name or path does not resolve to a file."""


class PullError(UkgpuError):
    """Fetching a registry-packaged model failed (network, hash, disk)."""


class QuantError(UkgpuError):
    """A ggml tensor format is unsupported, or raw data does not fit its block layout."""


class DeviceError(UkgpuError):
    """An accelerator failed under a running model (a driver call, a kernel launch).  When it is
    `sticky`, what the device held is lost, the model itself is not: the CPU backend can take
    over.  A device error that is not sticky refused one call and left the device usable."""

    @property
    def sticky(self) -> bool:
        """True: the device's context is lost, every later call fails (a subclass that can tell
        a refused call from a lost context says which)."""
        return True
