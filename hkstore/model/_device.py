"""The device policy: which accelerator new models use, and how a policy picks a jax device."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DevicePolicy",
    "get_device_policy",
    "policy_of",
    "put_on",
    "select_device",
    "set_device_policy",
    "to_host",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DevicePolicy:
    """Where models should live.

    Attributes:
        gpu: prefer a GPU (falls back to the CPU, with a warning, when there is none).
        idx: index of the device among those of the chosen kind; ``None`` means the first.
    """

    gpu: bool
    idx: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.gpu, bool):
            raise TypeError(f"DevicePolicy.gpu must be a bool, got {type(self.gpu).__name__}")
        if self.idx is not None and (
            isinstance(self.idx, bool) or not isinstance(self.idx, int) or self.idx < 0
        ):
            raise ValueError(f"DevicePolicy.idx must be None or an int >= 0, got {self.idx!r}")


# The process-wide policy used by models created (or re-placed) without an explicit one.
_POLICY = DevicePolicy(gpu=True, idx=None)


def get_device_policy() -> DevicePolicy:
    """Return the process-wide device policy (the default prefers a GPU)."""
    return _POLICY


def set_device_policy(gpu: bool, idx: int | None = None) -> DevicePolicy:
    """Set the process-wide device policy used by models created from now on.

    Existing models keep their device until their ``update_device_policy()`` is called.

    Args:
        gpu: prefer a GPU (``False``: always the CPU).
        idx: index of the device to use among those of the chosen kind (``None``: the first).

    Returns:
        The new policy.

    Raises:
        TypeError: ``gpu`` is not a bool.
        ValueError: ``idx`` is negative or not an int.

    Example:
        >>> from hkstore.model import set_device_policy
        >>> set_device_policy(gpu=False)
        DevicePolicy(gpu=False, idx=None)
    """
    global _POLICY
    _POLICY = DevicePolicy(gpu=gpu, idx=idx)
    return _POLICY


def _devices_of(platform: str) -> list[jax.Device]:
    try:
        return list(jax.devices(platform))
    except RuntimeError:  # that backend is not installed, or not enabled (JAX_PLATFORMS)
        return []


def select_device(policy: DevicePolicy | None = None) -> jax.Device:
    """Return the jax device that ``policy`` (default: the global policy) asks for.

    A GPU policy on a machine without GPU falls back to the first CPU, and an index past the
    last device falls back to device 0; both warn (``RuntimeWarning``) so the fallback is seen.

    Raises:
        TypeError: ``policy`` is not a :class:`DevicePolicy`.
    """
    if policy is None:
        policy = _POLICY
    if not isinstance(policy, DevicePolicy):
        raise TypeError(f"expected a DevicePolicy, got {type(policy).__name__}")
    devices: list[jax.Device] = []
    if policy.gpu:
        devices = _devices_of("gpu")
        if not devices:
            warnings.warn(
                "device policy asks for a GPU but jax sees none; using the CPU instead",
                RuntimeWarning,
                stacklevel=3,
            )
    if not devices:
        devices = _devices_of("cpu") or list(jax.devices())
    idx = 0 if policy.idx is None else policy.idx
    if idx >= len(devices):
        warnings.warn(
            f"device policy asks for {devices[0].platform} device {idx} but there are only "
            f"{len(devices)} ({', '.join(str(d) for d in devices)}); using device 0",
            RuntimeWarning,
            stacklevel=3,
        )
        idx = 0
    return devices[idx]


def policy_of(device: jax.Device) -> DevicePolicy:
    """Return the policy that selects ``device``: its kind and its index among that kind.

    Example:
        >>> policy_of(jax.devices("cpu")[0])
        DevicePolicy(gpu=False, idx=0)
    """
    gpu = device.platform == "gpu"
    same_kind = _devices_of(device.platform) or [device]
    idx = same_kind.index(device) if device in same_kind else 0
    return DevicePolicy(gpu=gpu, idx=idx)


def put_on(tree: T, device: jax.Device) -> T:
    """Return ``tree`` with every array committed to ``device``.

    jax arrays move with ``jax.device_put`` (no-op when already there). numpy arrays are
    *copied* into a new device buffer: on CPU, ``jax.device_put`` may alias a suitably aligned
    numpy buffer, and a caller reusing that buffer (a data loader filling the next batch, a
    ``set_weights`` caller editing its array) would then change what the model computes with.
    """

    def put(value: object) -> object:
        if isinstance(value, np.ndarray):
            return jnp.array(value, device=device, copy=True)
        return jax.device_put(value, device)

    return jax.tree_util.tree_map(put, tree)


def to_host(value: jax.Array) -> np.ndarray:
    """Copy one array to host memory; via pinned host memory where the device offers it."""
    devices = value.devices()
    device = next(iter(devices))
    if len(devices) == 1 and device.platform != "cpu":
        kinds = {memory.kind for memory in device.addressable_memories()}
        if "pinned_host" in kinds:  # DMA into page-locked memory, then a host-side view
            sharding = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
            try:
                return np.asarray(jax.device_put(value, sharding))
            except (RuntimeError, ValueError):  # a runtime that cannot stage: plain copy below
                pass
    return np.asarray(value)  # on CPU: a zero-copy view
