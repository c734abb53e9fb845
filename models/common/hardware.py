"""What the machine computes fast, for choices such as a training precision."""

from __future__ import annotations

import torch


def cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX tiles the OS lets torch use (AMX computes bf16
    matmuls in hardware; without it, bf16 on a CPU is emulated and slower than fp32).

    torch has no public query for this: `torch.backends.cpu.get_cpu_capability()` names the
    vector instruction set only (up to AVX512), and /proc/cpuinfo's `amx_tile` flag does not
    say whether the kernel granted the process the tile state. So the private
    `torch.cpu._is_amx_tile_supported()` is called here, the project's one use of it; a torch
    without it counts as no AMX (fp32: correct, only slower)."""
    is_supported = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(is_supported and is_supported())
