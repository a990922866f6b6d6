"""The IOTLB engine: memory regions, address spaces, transactions, persistence."""

from vdpad.iotlb.memory import PAGE_SIZE, MemoryRegion

__all__ = ["PAGE_SIZE", "MemoryRegion"]
