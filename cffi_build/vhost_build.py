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

/* Device-IOTLB misses of a vhost core device, answered in C from a table of
 * translations that Python loads (the UPDATE quads, sorted by IOVA): read
 * MISS, look up, write UPDATE, with no Python on the way. A miss the table
 * cannot answer, a refused UPDATE, anything else read, and (when tracing)
 * each answer are handed back to Python in a report. The core's mutex
 * orders answers against what Python writes to the device; functions marked
 * "locked" want it held by their caller. */
#define VDPAD_MISS_STOPPED ...
#define VDPAD_MISS_ANSWERED ...
#define VDPAD_MISS_UNANSWERED ...
#define VDPAD_MISS_REFUSED ...
#define VDPAD_MISS_UNEXPECTED ...
#define VDPAD_MISS_FAILED ...
#define VDPAD_MISS_MALFORMED ...

struct vdpad_miss_report {
    int what;            /* VDPAD_MISS_* */
    int error;           /* REFUSED, FAILED: errno; MALFORMED: bytes read */
    uint32_t version;    /* the message's version word */
    uint8_t type;        /* the message read */
    uint8_t perm;
    uint64_t iova;
    uint64_t size;
    int64_t started;     /* CLOCK_MONOTONIC ns just after it was read */
    uint64_t update[4];  /* ANSWERED, REFUSED: the UPDATE (iova, size, uaddr, perm) */
};

struct vdpad_miss_core {
    uint64_t served;     /* UPDATEs written for misses */
    uint64_t timed;      /* service times taken; the latest `window` are kept */
    size_t fresh;        /* table entries answered from since the last take */
    int serving;         /* 0: a MISS read is dropped, unanswered */
    ...;
};

/* A core keeping the latest `window` service times; NULL when out of memory. */
struct vdpad_miss_core *vdpad_miss_new(size_t window);
void vdpad_miss_free(struct vdpad_miss_core *core);
void vdpad_miss_lock(struct vdpad_miss_core *core);
void vdpad_miss_unlock(struct vdpad_miss_core *core);
/* Locked: answer from these `count` quads from now on; they stay the caller's, and must outlive the
 * table (until the next load). 0, or ENOMEM with the table left empty. */
int vdpad_miss_load(struct vdpad_miss_core *core, const uint64_t *quads, size_t count);
/* Locked: the indices of the entries answered from since the last take (each once per load) into `out`. */
size_t vdpad_miss_take_held(struct vdpad_miss_core *core, uint32_t *out, size_t room);
/* Locked: the latest service times (ns, MISS read to UPDATE written), oldest first. */
size_t vdpad_miss_times(struct vdpad_miss_core *core, int64_t *out, size_t room);
/* Read and answer misses on `fd` (non-blocking) until one needs Python or `stop_fd` is readable;
 * `trace`: every answer is reported too. Takes the lock for each answer. */
void vdpad_miss_serve(struct vdpad_miss_core *core, int fd, int stop_fd, uint32_t version, int trace,
                      struct vdpad_miss_report *report);
/* Locked: answer the miss in `report` (read by vdpad_miss_serve) from the table as it is now. */
void vdpad_miss_answer(struct vdpad_miss_core *core, int fd, uint32_t version, struct vdpad_miss_report *report);
"""

SOURCE = r"""
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
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

enum {
    VDPAD_MISS_STOPPED,
    VDPAD_MISS_ANSWERED,
    VDPAD_MISS_UNANSWERED,
    VDPAD_MISS_REFUSED,
    VDPAD_MISS_UNEXPECTED,
    VDPAD_MISS_FAILED,
    VDPAD_MISS_MALFORMED,
};

struct vdpad_miss_report {
    int what;
    int error;
    uint32_t version;
    uint8_t type;
    uint8_t perm;
    uint64_t iova;
    uint64_t size;
    int64_t started;
    uint64_t update[4];
};

struct vdpad_miss_core {
    uint64_t served;
    uint64_t timed;
    size_t fresh;
    int serving;
    pthread_mutex_t mutex;
    const uint64_t *table;  /* count quads: iova, size, uaddr, perm; sorted by iova, disjoint */
    size_t count;
    uint8_t *marked;   /* per entry: answered from since the load */
    uint32_t *held;    /* the first `fresh` of them not yet taken */
    int64_t *times;    /* a ring of `window` service times */
    size_t window;
};

static int64_t vdpad_now_ns(void)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

static struct vdpad_miss_core *vdpad_miss_new(size_t window)
{
    struct vdpad_miss_core *core = calloc(1, sizeof(*core));

    if (core == NULL)
        return NULL;
    core->window = window ? window : 1;
    core->times = calloc(core->window, sizeof(*core->times));
    if (core->times == NULL) {
        free(core);
        return NULL;
    }
    pthread_mutex_init(&core->mutex, NULL);
    return core;
}

static void vdpad_miss_unload(struct vdpad_miss_core *core)
{
    free(core->marked);
    free(core->held);
    core->table = NULL;
    core->marked = NULL;
    core->held = NULL;
    core->count = core->fresh = 0;
}

static void vdpad_miss_free(struct vdpad_miss_core *core)
{
    if (core == NULL)
        return;
    vdpad_miss_unload(core);
    pthread_mutex_destroy(&core->mutex);
    free(core->times);
    free(core);
}

static void vdpad_miss_lock(struct vdpad_miss_core *core)
{
    pthread_mutex_lock(&core->mutex);
}

static void vdpad_miss_unlock(struct vdpad_miss_core *core)
{
    pthread_mutex_unlock(&core->mutex);
}

static int vdpad_miss_load(struct vdpad_miss_core *core, const uint64_t *quads, size_t count)
{
    vdpad_miss_unload(core);
    if (count == 0)
        return 0;
    core->marked = calloc(count, 1);
    core->held = malloc(count * sizeof(*core->held));
    if (core->marked == NULL || core->held == NULL) {
        vdpad_miss_unload(core);
        return ENOMEM;
    }
    core->table = quads;
    core->count = count;
    return 0;
}

static size_t vdpad_miss_take_held(struct vdpad_miss_core *core, uint32_t *out, size_t room)
{
    size_t taken = core->fresh < room ? core->fresh : room;

    memcpy(out, core->held, taken * sizeof(*out));
    memmove(core->held, core->held + taken, (core->fresh - taken) * sizeof(*out));
    core->fresh -= taken;
    return taken;
}

static size_t vdpad_miss_times(struct vdpad_miss_core *core, int64_t *out, size_t room)
{
    size_t kept = core->timed < core->window ? (size_t)core->timed : core->window, i;
    uint64_t first = core->timed - kept;

    if (kept > room) {
        first += kept - room;
        kept = room;
    }
    for (i = 0; i < kept; i++)
        out[i] = core->times[(first + i) % core->window];
    return kept;
}

/* The index of the entry holding iova, or count when none does. */
static size_t vdpad_miss_covering(const struct vdpad_miss_core *core, uint64_t iova)
{
    size_t low = 0, high = core->count, middle;
    const uint64_t *entry;

    while (low < high) {  /* ends at the first entry starting after iova */
        middle = low + (high - low) / 2;
        if (core->table[4 * middle] <= iova)
            low = middle + 1;
        else
            high = middle;
    }
    if (low == 0)
        return core->count;
    entry = core->table + 4 * (low - 1);
    return iova - entry[0] < entry[1] ? low - 1 : core->count;
}

static void vdpad_miss_answer(struct vdpad_miss_core *core, int fd, uint32_t version,
                              struct vdpad_miss_report *report)
{
    union vdpad_iotlb_frame frame;
    size_t index = vdpad_miss_covering(core, report->iova), size;
    const uint64_t *entry;

    report->error = 0;
    if (index == core->count || (report->perm & ~core->table[4 * index + 3])) {
        report->what = VDPAD_MISS_UNANSWERED;  /* unmapped, or denied: Python tells which */
        return;
    }
    entry = core->table + 4 * index;
    memcpy(report->update, entry, sizeof(report->update));
    size = vdpad_iotlb_frame(&frame, version, 0, VHOST_IOTLB_UPDATE, entry[0], entry[1], entry[2],
                             (uint8_t)entry[3]);
    if ((report->error = vdpad_write_whole(fd, &frame, size))) {
        report->what = VDPAD_MISS_REFUSED;
        return;
    }
    core->times[core->timed++ % core->window] = vdpad_now_ns() - report->started;
    core->served++;
    if (!core->marked[index]) {
        core->marked[index] = 1;
        core->held[core->fresh++] = (uint32_t)index;
    }
    report->what = VDPAD_MISS_ANSWERED;
}

static void vdpad_miss_serve(struct vdpad_miss_core *core, int fd, int stop_fd, uint32_t version, int trace,
                             struct vdpad_miss_report *report)
{
    struct pollfd fds[2] = {{.fd = fd, .events = POLLIN}, {.fd = stop_fd, .events = POLLIN}};
    size_t expected = version == VHOST_IOTLB_MSG_V2 ? sizeof(struct vhost_msg_v2) : sizeof(struct vhost_msg);
    const struct vhost_iotlb_msg *iotlb;
    union vdpad_iotlb_frame miss;
    ssize_t got;

    for (;;) {
        got = read(fd, &miss, expected);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN && (poll(fds, 2, -1) >= 0 || errno == EINTR)) {
                if (fds[1].revents) {
                    report->what = VDPAD_MISS_STOPPED;
                    return;
                }
                continue;
            }
            report->what = VDPAD_MISS_FAILED;
            report->error = errno;
            return;
        }
        report->started = vdpad_now_ns();
        report->version = got < 4 ? 0 : version == VHOST_IOTLB_MSG_V2 ? miss.v2.type : (uint32_t)miss.v1.type;
        if ((size_t)got != expected || report->version != version) {
            report->what = VDPAD_MISS_MALFORMED;
            report->error = (int)got;
            return;
        }
        iotlb = version == VHOST_IOTLB_MSG_V2 ? &miss.v2.iotlb : &miss.v1.iotlb;
        report->type = iotlb->type;
        report->perm = iotlb->perm;
        report->iova = iotlb->iova;
        report->size = iotlb->size;
        if (iotlb->type != VHOST_IOTLB_MISS) {
            report->what = VDPAD_MISS_UNEXPECTED;
            return;
        }
        pthread_mutex_lock(&core->mutex);
        if (!core->serving) {  /* retired: the device gets no answer from here on */
            pthread_mutex_unlock(&core->mutex);
            continue;
        }
        vdpad_miss_answer(core, fd, version, report);
        pthread_mutex_unlock(&core->mutex);
        if (report->what != VDPAD_MISS_ANSWERED || trace)
            return;
    }
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("vdpad._uapi", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
