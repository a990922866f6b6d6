"""The IOTLB engine: memory regions, address spaces, transactions, persistence.

The API (stable; docs/iotlb.md explains the design)::

    from vdpad.iotlb import DeviceIotlb, MemoryRegion, Perm

    region = MemoryRegion(16 << 20, "rings")          # memfd, MAP_SHARED, sealed
    dev.set_owner()                                    # the engine needs an owned fd
    iotlb = DeviceIotlb(dev, persist=True,             # acks MSG_V2, BATCH, ASID (+ IOTLB_PERSIST
                        backend_features=BackendFeature.SUSPEND)  # when offered and persist) + extras,
                                                       # keeping what the fd acked before
    iotlb.persistent   # IOTLB_PERSIST acked (now): maps survive reset()
    iotlb.map_kind     # MapKind: set_map, dma_map, platform IOMMU (found from the node; None: unknown)
    iotlb.atomic_batches   # a commit reaches the device as one switch (set_map + IOTLB_BATCH)
    iotlb.as_num, iotlb.group_num, iotlb.iova_range, iotlb.acked, iotlb.open_batch

    with iotlb.transaction(asid=0) as tx:              # commit on clean exit; exception: nothing sent;
                                                        # allow_window=True: see "window" below
        tx.map(iova, region, offset, size, perm=Perm.RW)   # each op checked at once: InvalidArgument
        tx.unmap(iova, size)                            # may cut entries in two
    tx.sent                                             # the Plan that was sent (falsy if nothing)

    iotlb.map(asid, iova, region, offset, size, perm=Perm.RW)   # one-op transaction -> Plan
    iotlb.unmap(asid, iova, size)                               # -> Plan
    view = iotlb.space(asid)       # SpaceView: .entries (Mapping: iova, size, end, region, offset,
                                   # perm, uaddr), .lookup(iova), .units (kernel entries as sent),
                                   # .initial (the parent's initial map), .in_sync
    iotlb.mappings_of(region)      # where the kernel maps it now (MemoryRegion.close refuses meanwhile)
    iotlb.set_group_asid(group, asid)    # e.g. net cvq: group 1 -> AS 1; re-applied by reset()
    iotlb.reset()        # SET_STATUS(0); afterwards every AS translates as before: kept by the
                         # kernel (PERSIST: zero IOTLB messages) or replayed (one batch per AS)

    with iotlb.record() as trace:        # every IOTLB write, accepted or refused
        ...
    trace.messages(MessageType.UPDATE)   # the accepted UPDATEs (IotlbMessage)
    iotlb.add_recorder(callback)         # callback(Written(message, error)) on every write;
                                         # a callback that raises is logged, never breaks a commit

Errors: InvalidArgument (a ValueError; nothing was sent) for bad input, naming
what was wrong: outside GET_IOVA_RANGE, size <= 0, iova/offset/size not page
aligned, overlap with what is mapped, perm not RO/WO/RW, region too small or
closed, asid >= as_num, unmap of nothing. VhostError (an OSError) when the
kernel refuses a message: what had been sent is undone first (in the same
batch), so the kernel holds exactly what it held; RollbackError if the undo
is refused too.

Window: on a parent that applies each message at once (not set_map + BATCH),
a commit that unmaps bytes which stay mapped, while the device runs, is
wrapped in SUSPEND/RESUME when both are acked, and refused naming the window
otherwise (unless allow_window). docs/iotlb.md has the table per parent.

Threads and trio: the engine is thread-safe (one lock). A write that pins
pages (PA mode) blocks, so from a trio task use the async variants, which
run in the device's worker lane, in call order: `async with iotlb.atransaction(asid) as tx`,
`await iotlb.amap(...)`, `aunmap`, `areset`, `aset_group_asid`.
"""

from vdpad.device.iotlb_msg import Access as Perm
from vdpad.iotlb.engine import DeviceIotlb, RollbackError, SpaceView, Trace, Transaction, Written
from vdpad.iotlb.memory import PAGE_SIZE, MemoryRegion, RegionInUse
from vdpad.iotlb.plan import Plan
from vdpad.iotlb.space import AddressMap, Mapping

__all__ = [
    "PAGE_SIZE", "AddressMap", "DeviceIotlb", "Mapping", "MemoryRegion", "Perm", "Plan", "RegionInUse", "RollbackError",
    "SpaceView", "Trace", "Transaction", "Written",
]
