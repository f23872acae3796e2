"""FLOPs of a training step (nanoGPT's estimate_mfu) and the chips' datasheet peaks: the
benchmark's MFU and the training loop's log line use the same figures."""

from jaxgpt import optim

# Dense (no sparsity) peak TFLOP/s per chip from the vendors' datasheets: NVIDIA H100/H200
# datasheet (SXM), A100 datasheet, V100 and T4 datasheets (no bf16: fp16 tensor-core figure), L4
# datasheet (its 242 bf16 figure is with sparsity: half of it dense); Google Cloud
# TPU system-architecture pages (v4, v5e, v5p, v6e). "float32" on NVIDIA is the TF32 tensor-core
# figure (XLA's default precision for float32 matmuls on Ampere and later); TPUs run float32
# matmuls at default precision as bf16 passes, so only the bf16 figure is listed for them.
# First matching substring of device_kind wins (so "H100 PCIe" is tried before "H100").
PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.4, "float32": 494.7}),  # SXM
    ("H200", {"bfloat16": 989.4, "float32": 494.7}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),  # nanoGPT's estimate_mfu uses 312
    ("V100", {"float16": 125.0, "float32": 15.7}),  # SXM2
    ("T4", {"float16": 65.0, "float32": 8.1}),  # T4 datasheet (Colab's free GPU)
    ("L40S", {"bfloat16": 362.0, "float16": 362.0, "float32": 183.0}),  # before "L4"
    ("L4", {"bfloat16": 121.0, "float16": 121.0, "float32": 60.0}),  # L4 datasheet, dense
    ("TPU v4", {"bfloat16": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0}),  # v5e
    ("TPU v5e", {"bfloat16": 197.0}),
    ("TPU v5", {"bfloat16": 459.0}),  # v5p
    ("TPU v6", {"bfloat16": 918.0}),  # v6e (Trillium)
)


def flops_per_token(config, n_params: int) -> int:
    """nanoGPT's estimate_mfu: 6N for the weight matmuls (forward 2N, backward 4N) plus
    attention's QK^T and (att)V, 2·2·T·C forward per token and layer, x3 with the backward."""
    L, H, Q, T = config.n_layer, config.n_head, config.n_embd // config.n_head, config.block_size
    return 6 * n_params + 12 * L * H * Q * T


def optimizer_flops(config, params) -> int:
    """Muon's Newton–Schulz matmul FLOPs per step (optim.newton_schulz_flops); 0 for AdamW,
    whose elementwise update nanoGPT's count leaves out too. Not model FLOPs: MFU leaves them
    out (Muon's extra work shows as a lower MFU); the benchmark and aot print them beside."""
    if config.optimizer != "muon":
        return 0
    return optim.newton_schulz_flops(params, config.muon_ns_steps)


def datasheet_peak(device, dtype: str) -> tuple[float, str]:
    """(FLOP/s, source) from PEAK_TFLOPS for a GPU/TPU; NaN for a device not in the table."""
    for name, peaks in PEAK_TFLOPS:
        if name.lower() in device.device_kind.lower():
            key = dtype if dtype in peaks else max(peaks, key=peaks.get)
            return peaks[key] * 1e12, f"datasheet {name} {key}"
    return float("nan"), f"unknown device {device.device_kind!r}: add it to PEAK_TFLOPS"
