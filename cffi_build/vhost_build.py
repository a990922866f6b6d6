"""The C side of vdpad: the vhost / vhost-vdpa uapi, compiled by cffi.

API mode: the structs and ioctl numbers are taken from the build host's
<linux/vhost.h> by the C compiler, so sizes and offsets are the kernel's own.
Debian bookworm ships 6.1 headers; what came later (RESUME, the vring desc
group, the vring size, the newer backend feature bits) is defined here under
#ifndef with the 6.12 values, so the module builds anywhere and the kernel
tells at run time what it supports (ENOTTY for an unknown ioctl).
"""

from cffi import FFI

CDEF = r"""
/* <linux/vhost_types.h> */
struct vhost_vring_state { unsigned int index; unsigned int num; };
struct vhost_vring_file { unsigned int index; int fd; };
struct vhost_vring_addr {
    unsigned int index;
    unsigned int flags;
    uint64_t desc_user_addr;
    uint64_t used_user_addr;
    uint64_t avail_user_addr;
    uint64_t log_guest_addr;
};
struct vhost_iotlb_msg {
    uint64_t iova;
    uint64_t size;
    uint64_t uaddr;
    uint8_t perm;
    uint8_t type;
};
struct vhost_msg {
    int type;
    union { struct vhost_iotlb_msg iotlb; uint8_t padding[64]; };
};
struct vhost_msg_v2 {
    uint32_t type;
    uint32_t asid;
    union { struct vhost_iotlb_msg iotlb; uint8_t padding[64]; };
};
struct vhost_memory_region {
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    uint64_t flags_padding;
};
struct vhost_memory {
    uint32_t nregions;
    uint32_t padding;
    struct vhost_memory_region regions[];
};
struct vhost_vdpa_config { uint32_t off; uint32_t len; uint8_t buf[]; };
struct vhost_vdpa_iova_range { uint64_t first; uint64_t last; };

#define VHOST_VIRTIO ...
#define VHOST_FILE_UNBIND ...
#define VHOST_PAGE_SIZE ...
#define VHOST_VRING_F_LOG ...
#define VHOST_VRING_LITTLE_ENDIAN ...
#define VHOST_VRING_BIG_ENDIAN ...
#define VHOST_F_LOG_ALL ...
#define VHOST_NET_F_VIRTIO_NET_HDR ...

#define VHOST_ACCESS_RO ...
#define VHOST_ACCESS_WO ...
#define VHOST_ACCESS_RW ...
#define VHOST_IOTLB_MISS ...
#define VHOST_IOTLB_UPDATE ...
#define VHOST_IOTLB_INVALIDATE ...
#define VHOST_IOTLB_ACCESS_FAIL ...
#define VHOST_IOTLB_BATCH_BEGIN ...
#define VHOST_IOTLB_BATCH_END ...
#define VHOST_IOTLB_MSG ...
#define VHOST_IOTLB_MSG_V2 ...

#define VHOST_BACKEND_F_IOTLB_MSG_V2 ...
#define VHOST_BACKEND_F_IOTLB_BATCH ...
#define VHOST_BACKEND_F_IOTLB_ASID ...
#define VHOST_BACKEND_F_SUSPEND ...
#define VHOST_BACKEND_F_RESUME ...
#define VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK ...
#define VHOST_BACKEND_F_DESC_ASID ...
#define VHOST_BACKEND_F_IOTLB_PERSIST ...

/* <linux/vhost.h>: vhost core */
#define VHOST_GET_FEATURES ...
#define VHOST_SET_FEATURES ...
#define VHOST_SET_OWNER ...
#define VHOST_RESET_OWNER ...
#define VHOST_SET_MEM_TABLE ...
#define VHOST_SET_LOG_BASE ...
#define VHOST_SET_LOG_FD ...
#define VHOST_SET_VRING_NUM ...
#define VHOST_SET_VRING_ADDR ...
#define VHOST_SET_VRING_BASE ...
#define VHOST_GET_VRING_BASE ...
#define VHOST_SET_VRING_ENDIAN ...
#define VHOST_GET_VRING_ENDIAN ...
#define VHOST_SET_VRING_KICK ...
#define VHOST_SET_VRING_CALL ...
#define VHOST_SET_VRING_ERR ...
#define VHOST_SET_VRING_BUSYLOOP_TIMEOUT ...
#define VHOST_GET_VRING_BUSYLOOP_TIMEOUT ...
#define VHOST_SET_BACKEND_FEATURES ...
#define VHOST_GET_BACKEND_FEATURES ...
#define VHOST_NET_SET_BACKEND ...

/* <linux/vhost.h>: vhost-vdpa */
#define VHOST_VDPA_GET_DEVICE_ID ...
#define VHOST_VDPA_GET_STATUS ...
#define VHOST_VDPA_SET_STATUS ...
#define VHOST_VDPA_GET_CONFIG ...
#define VHOST_VDPA_SET_CONFIG ...
#define VHOST_VDPA_SET_VRING_ENABLE ...
#define VHOST_VDPA_GET_VRING_NUM ...
#define VHOST_VDPA_SET_CONFIG_CALL ...
#define VHOST_VDPA_GET_IOVA_RANGE ...
#define VHOST_VDPA_GET_CONFIG_SIZE ...
#define VHOST_VDPA_GET_AS_NUM ...
#define VHOST_VDPA_GET_VRING_GROUP ...
#define VHOST_VDPA_SET_GROUP_ASID ...
#define VHOST_VDPA_SUSPEND ...
#define VHOST_VDPA_RESUME ...
#define VHOST_VDPA_GET_VRING_DESC_GROUP ...
#define VHOST_VDPA_GET_VQS_COUNT ...
#define VHOST_VDPA_GET_GROUP_NUM ...
#define VHOST_VDPA_GET_VRING_SIZE ...

/* One entry point per argument kind. cffi releases the GIL around each call,
 * so a worker thread blocked in the kernel (pinning pages) blocks nobody. */
int vdpad_ioctl_none(int fd, unsigned long request);
int vdpad_ioctl_ptr(int fd, unsigned long request, void *arg);

/* IOTLB batches: BATCH_BEGIN (when `begin`), INVALIDATEs given as (iova,
 * size) pairs, UPDATEs as (iova, size, uaddr, perm) quads, BATCH_END (when
 * `end`), all of one address space. Python hands the ranges over as flat
 * arrays; framing, checking and writing them is C, one crossing each. */

/* Index in the body (INVALIDATEs, then UPDATEs) of the first message the
 * kernel would refuse as malformed, `invalidated + updated` when none is: a
 * range that is empty or runs past 2^64, an UPDATE whose memory runs past
 * 2^64, whose perm is not RO, WO or RW, or that leaves [first, last]. */
size_t vdpad_iotlb_check(const uint64_t *invalidate, size_t invalidated, const uint64_t *update,
                         size_t updated, uint64_t first, uint64_t last);

/* The batch framed as the kernel reads it (struct vhost_msg, or
 * vhost_msg_v2 carrying `asid`), back to back into `out`, which holds
 * room for them all. Returns how many messages. */
size_t vdpad_iotlb_pack(unsigned int version, uint32_t asid, int begin, int end, const uint64_t *invalidate,
                        size_t invalidated, const uint64_t *update, size_t updated, char *out);

/* The batch checked whole (vdpad_iotlb_check) and, when no message is
 * malformed, written framed one message per write() (the kernel takes one
 * per call) until one is refused; the GIL is released throughout. Returns
 * how many messages the kernel took, *error being the refusal's errno, 0
 * when it took them all. A malformed message writes nothing: *error is -1
 * and the return is its index in the body. */
size_t vdpad_iotlb_write(int fd, unsigned int version, uint32_t asid, int begin, int end,
                         const uint64_t *invalidate, size_t invalidated, const uint64_t *update,
                         size_t updated, uint64_t first, uint64_t last, int *error);
"""

SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/vhost.h>

/* Newer than the 6.1 uapi of Debian bookworm; values from 6.12. */
#ifndef VHOST_BACKEND_F_SUSPEND
#define VHOST_BACKEND_F_SUSPEND 0x4
#endif
#ifndef VHOST_BACKEND_F_RESUME
#define VHOST_BACKEND_F_RESUME 0x5
#endif
#ifndef VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK
#define VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK 0x6
#endif
#ifndef VHOST_BACKEND_F_DESC_ASID
#define VHOST_BACKEND_F_DESC_ASID 0x7
#endif
#ifndef VHOST_BACKEND_F_IOTLB_PERSIST
#define VHOST_BACKEND_F_IOTLB_PERSIST 0x8
#endif
#ifndef VHOST_VDPA_SUSPEND
#define VHOST_VDPA_SUSPEND _IO(VHOST_VIRTIO, 0x7D)
#endif
#ifndef VHOST_VDPA_RESUME
#define VHOST_VDPA_RESUME _IO(VHOST_VIRTIO, 0x7E)
#endif
#ifndef VHOST_VDPA_GET_VRING_DESC_GROUP
#define VHOST_VDPA_GET_VRING_DESC_GROUP _IOWR(VHOST_VIRTIO, 0x7F, struct vhost_vring_state)
#endif
#ifndef VHOST_VDPA_GET_VRING_SIZE
#define VHOST_VDPA_GET_VRING_SIZE _IOWR(VHOST_VIRTIO, 0x82, struct vhost_vring_state)
#endif

static int vdpad_ioctl_none(int fd, unsigned long request)
{
    return ioctl(fd, request);
}

static int vdpad_ioctl_ptr(int fd, unsigned long request, void *arg)
{
    return ioctl(fd, request, arg);
}

static int vdpad_range_fits(uint64_t start, uint64_t size)
{
    return size && size - 1 <= UINT64_MAX - start;
}

static size_t vdpad_iotlb_check(const uint64_t *invalidate, size_t invalidated, const uint64_t *update,
                                size_t updated, uint64_t first, uint64_t last)
{
    size_t i;

    for (i = 0; i < invalidated; i++)
        if (!vdpad_range_fits(invalidate[2 * i], invalidate[2 * i + 1]))
            return i;
    for (i = 0; i < updated; i++) {
        const uint64_t *u = update + 4 * i;  /* iova, size, uaddr, perm */

        if (!vdpad_range_fits(u[0], u[1]) || !vdpad_range_fits(u[2], u[1])
            || u[3] < VHOST_ACCESS_RO || u[3] > VHOST_ACCESS_RW || u[0] < first || u[0] + (u[1] - 1) > last)
            return invalidated + i;
    }
    return invalidated + updated;
}

union vdpad_iotlb_frame {
    struct vhost_msg v1;
    struct vhost_msg_v2 v2;
};

/* One message framed in `version`; returns its size. */
static size_t vdpad_iotlb_frame(union vdpad_iotlb_frame *frame, unsigned int version, uint32_t asid, uint8_t type,
                                uint64_t iova, uint64_t size, uint64_t uaddr, uint8_t perm)
{
    struct vhost_iotlb_msg *iotlb;

    memset(frame, 0, sizeof(*frame));
    if (version == VHOST_IOTLB_MSG_V2) {
        frame->v2.type = version;
        frame->v2.asid = asid;
        iotlb = &frame->v2.iotlb;
    } else {
        frame->v1.type = (int)version;
        iotlb = &frame->v1.iotlb;
    }
    iotlb->iova = iova;
    iotlb->size = size;
    iotlb->uaddr = uaddr;
    iotlb->perm = perm;
    iotlb->type = type;
    return version == VHOST_IOTLB_MSG_V2 ? sizeof(frame->v2) : sizeof(frame->v1);
}

/* Message `i` of the batch framed: BATCH_BEGIN (when `begin`), the INVALIDATEs, the UPDATEs,
 * BATCH_END (when `end`), in that order. Returns its size. */
static size_t vdpad_iotlb_message(union vdpad_iotlb_frame *frame, unsigned int version, uint32_t asid, int begin,
                                  const uint64_t *invalidate, size_t invalidated, const uint64_t *update,
                                  size_t updated, size_t i)
{
    const uint64_t *u;

    if (begin && i-- == 0)
        return vdpad_iotlb_frame(frame, version, asid, VHOST_IOTLB_BATCH_BEGIN, 0, 0, 0, 0);
    if (i < invalidated)
        return vdpad_iotlb_frame(frame, version, asid, VHOST_IOTLB_INVALIDATE, invalidate[2 * i],
                                 invalidate[2 * i + 1], 0, 0);
    if (i - invalidated >= updated)  /* past the body: the batch's end */
        return vdpad_iotlb_frame(frame, version, asid, VHOST_IOTLB_BATCH_END, 0, 0, 0, 0);
    u = update + 4 * (i - invalidated);  /* iova, size, uaddr, perm */
    return vdpad_iotlb_frame(frame, version, asid, VHOST_IOTLB_UPDATE, u[0], u[1], u[2], (uint8_t)u[3]);
}

static size_t vdpad_iotlb_pack(unsigned int version, uint32_t asid, int begin, int end, const uint64_t *invalidate,
                               size_t invalidated, const uint64_t *update, size_t updated, char *out)
{
    union vdpad_iotlb_frame frame;
    size_t count = !!begin + invalidated + updated + !!end, i, size;

    for (i = 0; i < count; i++) {
        size = vdpad_iotlb_message(&frame, version, asid, begin, invalidate, invalidated, update, updated, i);
        memcpy(out, &frame, size);
        out += size;
    }
    return count;
}

/* 0 when the kernel took the whole message, else the refusal's errno. */
static int vdpad_write_whole(int fd, const union vdpad_iotlb_frame *frame, size_t size)
{
    ssize_t written;

    do  /* as os.write does (PEP 475): a signal is no refusal */
        written = write(fd, frame, size);
    while (written < 0 && errno == EINTR);
    if (written == (ssize_t)size)
        return 0;
    /* vhost takes a message whole or refuses it: a short count would be new, told as EIO */
    return written < 0 ? errno : EIO;
}

static size_t vdpad_iotlb_write(int fd, unsigned int version, uint32_t asid, int begin, int end,
                                const uint64_t *invalidate, size_t invalidated, const uint64_t *update,
                                size_t updated, uint64_t first, uint64_t last, int *error)
{
    union vdpad_iotlb_frame frame;
    size_t count = !!begin + invalidated + updated + !!end, taken, size;

    taken = vdpad_iotlb_check(invalidate, invalidated, update, updated, first, last);
    if (taken < invalidated + updated) {
        *error = -1;
        return taken;
    }
    *error = 0;
    for (taken = 0; taken < count; taken++) {
        size = vdpad_iotlb_message(&frame, version, asid, begin, invalidate, invalidated, update, updated, taken);
        if ((*error = vdpad_write_whole(fd, &frame, size)))
            break;
    }
    return taken;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("vdpad._uapi", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
