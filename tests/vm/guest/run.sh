#!/bin/sh
# PID 1 on the overlay root (or a service of systemd as PID 1, which made
# these mounts itself): finish the mounts a test expects, run the run's
# command.sh with its output on the virtio-serial ports, report its exit code
# on the third port, power off.
run=$1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
if [ $$ -eq 1 ]; then
    mkdir -p /dev/pts /dev/shm
    mount -t devpts -o mode=620,ptmxmode=666 devpts /dev/pts
    mount -t tmpfs shm /dev/shm
    mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
    mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
    ln -sf /proc/self/fd /dev/fd
    ln -sf /proc/mounts /etc/mtab 2>/dev/null
    ip link set lo up 2>/dev/null
fi
hostname vdpad-vm

# virtio-serial ports appear asynchronously (virtio_console loads on demand)
port() {
    for p in /sys/class/virtio-ports/vport*; do
        [ "$(cat "$p/name" 2>/dev/null)" = "vdpad.$1" ] && { echo "/dev/${p##*/}"; return; }
    done
}
i=0
while :; do
    out=$(port stdout); err=$(port stderr); rc=$(port rc)
    [ -c "$out" ] && [ -c "$err" ] && [ -c "$rc" ] && break
    i=$((i + 1))
    if [ $i -gt 200 ]; then
        echo "vdpad vm: virtio-serial ports missing" >/dev/console
        poweroff -f
    fi
    sleep 0.05
done
/bin/sh "$run/command.sh" </dev/null >"$out" 2>"$err"
echo $? >"$rc"
sync
if [ $$ -ne 1 ]; then
    systemctl poweroff -ff  # at once: the command is done and its output synced
fi
poweroff -f 2>/dev/null || echo o >/proc/sysrq-trigger
sleep 10
