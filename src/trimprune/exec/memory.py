"""How much GPU memory this process may still take."""

from __future__ import annotations

import torch


def usable_bytes(device: torch.device) -> int:
    """Free memory on `device` for this process: what the driver reports free plus what PyTorch's
    allocator holds unused, within the cap of `torch.cuda.set_per_process_memory_fraction`."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    cap = torch.cuda.get_per_process_memory_fraction(device) * total
    return int(max(0, min(free + reserved - allocated, cap - allocated)))
