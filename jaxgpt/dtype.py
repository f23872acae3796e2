"""The compute dtype by device: what `dtype="auto"` picks, and why (params stay float32)."""

import jax

DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: by the device (auto_dtype)


def auto_dtype(device=None) -> tuple[str, str]:
    """(compute dtype, why) that dtype="auto" picks for `device` (default: the first device).

    bfloat16 where the chip multiplies it fast: TPUs, and NVIDIA GPUs from compute capability
    8.0 (Ampere: A100, RTX 30, L4, H100). Before Ampere (T4, V100, RTX 20: 7.x) there is no fast
    bfloat16, but float16 tensor cores: float16, trained with dynamic loss scaling (step.py),
    as nanoGPT falls back to float16 + GradScaler. Below 7.0 (P100, GTX 10) float16 has no
    tensor cores and on most of those cards a fraction of float32's rate: float32. A CPU
    emulates bfloat16 (slower than float32): float32.
    """
    device = device or jax.devices()[0]
    if device.platform == "tpu":
        return "bfloat16", "a TPU multiplies bfloat16 natively"
    if device.platform != "gpu":
        return "float32", "a CPU has no fast bfloat16 or float16 matmul"
    cc = getattr(device, "compute_capability", None)  # "8.0" on CUDA; none on ROCm
    if cc is None:
        return "bfloat16", f"{device.device_kind} has bfloat16 matmuls"
    major, minor = (int(v) for v in str(cc).split(".")[:2])
    if (major, minor) >= (8, 0):
        return "bfloat16", f"{device.device_kind} (compute capability {cc}) has bfloat16 cores"
    if major >= 7:
        return "float16", (f"{device.device_kind} (compute capability {cc}) has no fast "
                           "bfloat16 but float16 tensor cores: float16 with dynamic loss scaling")
    return "float32", (f"{device.device_kind} (compute capability {cc}) has no tensor cores, "
                       "and float16 is slow on most such cards")


def resolve_dtype(name: str, device=None) -> str:
    """The compute dtype a config's `dtype` names: "auto" is auto_dtype's choice."""
    return auto_dtype(device)[0] if name == "auto" else name
