"""Boot a real kernel with vdpa_sim under QEMU and run a command inside it.

The host kernel has no vDPA, so every test that needs /dev/vhost-vdpa-N runs
in a guest: Debian's newest <codename>-backports kernel, booted with TCG, with
vringh and vdpa_sim{,_net,_blk} built out of tree from that kernel's own
source package, and the host's / shared read-only over 9p under a tmpfs
overlay (the guest sees this checkout and its virtualenv at the same paths).

    python -m tests.vm.harness prepare          # install, download, build
    python -m tests.vm.harness run -- CMD ...   # boot, run CMD in $PWD, exit with its code
    python -m tests.vm.harness run --init systemd -- CMD ...   # the same with systemd as PID 1

Everything downloaded or built is kept in the cache folder (.vm/ in the
checkout, or $VDPAD_VM_CACHE), one stamp per stage, so a second run only
boots. The guest can write files to $VDPAD_VM_OUT; they are kept on the host
in the run folder, whose path is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUEST_FILES = Path(__file__).resolve().parent / "guest"
CACHE = Path(os.environ.get("VDPAD_VM_CACHE", REPO / ".vm")).resolve()

# Host tools the stages call, by the command that shows each is there.
HOST_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-storage-daemon": "qemu-system-common",  # serves the VDUSE blk device of the kernel tests (tests/vduse.py)
    "cpio": "cpio",
    "depmod": "kmod",
    "vdpa": "iproute2",
    "make": "make",
    "x86_64-linux-gnu-gcc-12": "gcc-12",
    "xz": "xz-utils",  # tar -xJ
    "dpkg-deb": "dpkg",
    "gzip": "gzip",
}
HOST_LIBS = {"/usr/include/libelf.h": "libelf-dev"}
# Modules the initramfs needs before it can mount the host's root.
INITRAMFS_MODULES = ("9p", "9pnet_virtio", "overlay")
# The kernel source files vdpa_sim needs (never kept beyond the cache).
SOURCE_GLOBS = ("*/drivers/vdpa/vdpa_sim/*", "*/drivers/vhost/vringh.c")
SIM_MODULES = ("vringh", "vdpa_sim", "vdpa_sim_net", "vdpa_sim_blk")
# How PID 1 is started: the runner itself (sh), or the host's systemd, booted
# to the guest's own target (guest/systemd/) so that none of the host's enabled
# units start.
INITS = ("sh", "systemd")
# Units that fail or only cost boot time in the guest (no network, no clock,
# no udev, no disks), masked from the kernel command line.
SYSTEMD_MASKED = (
    "systemd-tmpfiles-setup.service",  # `D /tmp` would empty the host's /tmp into whiteouts, file by file over 9p
    "systemd-timesyncd.service", "systemd-pstore.service", "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount", "sys-kernel-config.mount", "sys-fs-fuse-connections.mount",
    "modprobe@dm_mod.service", "modprobe@fuse.service", "modprobe@loop.service", "modprobe@drm.service",
    "modprobe@efi_pstore.service", "systemd-update-utmp.service", "systemd-random-seed.service",
    "systemd-sysusers.service",
)
SYSTEMD_CMDLINE = ("systemd.unit=vdpad-vm.target", "fstab=no", "systemd.firstboot=0", "systemd.show_status=1",
                   *(f"systemd.mask={unit}" for unit in SYSTEMD_MASKED))


class HarnessError(RuntimeError):
    """A set-up stage failed; the message says which and why."""


def log(message: str) -> None:
    if not os.environ.get("VDPAD_VM_QUIET"):
        print(f"[vm {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(*argv: str | Path, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, failing with its stderr in the message."""
    args = [str(a) for a in argv]
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    proc = subprocess.run(args, text=True, **kwargs)
    if proc.returncode != 0:
        raise HarnessError(
            f"{shlex.join(args)} exited {proc.returncode}: {(proc.stderr or '').strip()[-2000:]}"
        )
    return proc


def tool_path(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


@dataclass(frozen=True)
class Kernel:
    release: str  # uname -r, e.g. 6.12.95+deb12-amd64
    version: str  # Debian package version, e.g. 6.12.95-1~bpo12+1

    @property
    def abi(self) -> str:  # 6.12.95+deb12
        return self.release.removesuffix("-amd64")

    @property
    def series(self) -> str:  # 6.12
        return ".".join(self.release.split(".")[:2])

    @property
    def packages(self) -> list[str]:
        return [
            f"linux-image-{self.release}",
            f"linux-headers-{self.release}",
            f"linux-headers-{self.abi}-common",
            f"linux-kbuild-{self.abi}",
            f"linux-source-{self.series}",
        ]

    def deb(self, package: str) -> Path:
        quoted = self.version.replace(":", "%3a")
        matches = sorted((CACHE / "dl").glob(f"{package}_{quoted}_*.deb"))
        if not matches:
            raise HarnessError(f"{package} {self.version} is not in {CACHE / 'dl'}")
        return matches[0]

    @property
    def root(self) -> Path:  # unpacked linux-image, our modules in extra/
        return CACHE / "kernel" / self.release

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    @property
    def image(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def headers(self) -> Path:
        return CACHE / "headers" / self.release / "usr" / "src" / f"linux-headers-{self.release}"


# ------------------------------------------------------------------ stages

def busybox_is_static() -> bool:
    """The initramfs has no libc: its busybox must have no ELF interpreter."""
    busybox = shutil.which("busybox")
    return bool(busybox) and b"/ld-linux" not in Path(busybox).read_bytes()


def ensure_host_tools() -> None:
    missing = [pkg for cmd, pkg in HOST_TOOLS.items() if not tool_path(cmd)]
    missing += [pkg for path, pkg in HOST_LIBS.items() if not os.path.exists(path)]
    if not busybox_is_static():
        missing.append("busybox-static")
    if not missing:
        return
    if os.geteuid() != 0:
        raise HarnessError(f"host tools missing and not root to install them: {' '.join(missing)}")
    log(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run("apt-get", "update", "-q", env=env)
    run("apt-get", "install", "-y", "-q", "--no-install-recommends", *missing, env=env)


def debian_mirror(apt_etc: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this system's apt already uses (never a fixed host)."""
    for sources in sorted((apt_etc / "sources.list.d").glob("*.sources")):
        for stanza in sources.read_text().split("\n\n"):
            fields = dict(
                line.split(":", 1) for line in stanza.splitlines()
                if ":" in line and not line.startswith("#")
            )
            uris, suites = fields.get("URIs", "").split(), fields.get("Suites", "")
            if uris and "security" not in suites and "security" not in uris[0]:
                return uris[0]
    with contextlib.suppress(FileNotFoundError):
        for line in (apt_etc / "sources.list").read_text().splitlines():
            words = line.split()
            if words[:1] == ["deb"] and "security" not in line:
                return next(w for w in words[1:] if "://" in w)
    raise HarnessError(f"no Debian mirror found in {apt_etc}/sources.list{{,.d/*.sources}}")


def backports_apt() -> list[str]:
    """apt options that reach <codename>-backports through a private state dir."""
    apt = CACHE / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    codename = re.search(r"^VERSION_CODENAME=(\S+)", Path("/etc/os-release").read_text(), re.M)
    if not codename:
        raise HarnessError("no VERSION_CODENAME in /etc/os-release")
    line = (f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
            f"{debian_mirror()} {codename.group(1)}-backports main\n")
    (apt / "sources.list").write_text(line)
    return ["-q", "-o", f"Dir::Etc::sourcelist={apt / 'sources.list'}",
            "-o", "Dir::Etc::sourceparts=-", "-o", f"Dir::State::Lists={apt / 'lists'}",
            "-o", f"Dir::Cache={apt / 'cache'}", "-o", "APT::Sandbox::User=root"]


def newest_kernel(apt_cache_show: str) -> Kernel:
    """The image the newest linux-image-amd64 stanza depends on."""
    found = re.findall(r"^Depends:\s*linux-image-(\S+)\s*\(=\s*([^)\s]+)\)", apt_cache_show, re.M)
    if not found:
        raise HarnessError("linux-image-amd64 in backports names no kernel image")
    release, version = max(found, key=lambda rv: [int(n) for n in re.findall(r"\d+", rv[1])])
    return Kernel(release=release, version=version)


def resolve_kernel(refresh: bool) -> Kernel:
    """The newest backports kernel; remembered, as backports keeps only one."""
    remembered = CACHE / "kernel.json"
    if remembered.exists() and not refresh:
        return Kernel(**json.loads(remembered.read_text()))
    opts = backports_apt()
    run("apt-get", *opts, "update")
    kernel = newest_kernel(run("apt-cache", *opts, "show", "linux-image-amd64").stdout)
    log(f"kernel {kernel.release} ({kernel.version})")
    remembered.write_text(json.dumps(kernel.__dict__))
    return kernel


def download(kernel: Kernel) -> None:
    dl = CACHE / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    opts = None
    for package in kernel.packages:
        with contextlib.suppress(HarnessError):
            kernel.deb(package)
            continue
        opts = opts or backports_apt()
        if not any((CACHE / "apt" / "lists").glob("*Packages*")):
            run("apt-get", *opts, "update")
        log(f"download {package} {kernel.version}")
        # Into a scratch dir first: a broken download is never taken for a
        # whole one (apt-get checks the hash before it renames).
        with tempfile.TemporaryDirectory(dir=dl) as scratch:
            run("apt-get", *opts, "download", f"{package}={kernel.version}", cwd=scratch)
            for deb in Path(scratch).glob("*.deb"):
                deb.rename(dl / deb.name)


def unpack(kernel: Kernel) -> Path:
    """Unpack image, headers and the few source files; return the source dir."""
    if not (kernel.root / ".unpacked").exists():
        shutil.rmtree(kernel.root, ignore_errors=True)
        kernel.root.mkdir(parents=True)
        run("dpkg-deb", "-x", kernel.deb(f"linux-image-{kernel.release}"), kernel.root)
        (kernel.root / ".unpacked").touch()
    hdr_root = CACHE / "headers" / kernel.release
    if not (hdr_root / ".unpacked").exists():
        shutil.rmtree(hdr_root, ignore_errors=True)
        hdr_root.mkdir(parents=True)
        for package in kernel.packages[1:4]:
            run("dpkg-deb", "-x", kernel.deb(package), hdr_root)
        # The arch Makefile includes the common one by absolute /usr/src path.
        makefile = kernel.headers / "Makefile"
        makefile.write_text(re.sub(r"^include /usr/src/", f"include {hdr_root}/usr/src/",
                                   makefile.read_text(), flags=re.M))
        (hdr_root / ".unpacked").touch()
    src_root = CACHE / "source" / kernel.release
    if not (src_root / ".unpacked").exists():
        shutil.rmtree(src_root, ignore_errors=True)
        src_root.mkdir(parents=True)
        deb = shlex.quote(str(kernel.deb(f"linux-source-{kernel.series}")))
        globs = " ".join(shlex.quote(g) for g in SOURCE_GLOBS)
        # Only the files vdpa_sim needs out of the ~150 MB tarball.
        run("bash", "-o", "pipefail", "-c",
            f"dpkg-deb --fsys-tarfile {deb} | tar -xO --wildcards './usr/src/linux-source-*.tar.xz'"
            f" | tar -xJ -C {shlex.quote(str(src_root))} --wildcards {globs}")
        (src_root / ".unpacked").touch()
    trees = list(src_root.glob("linux-source-*"))
    if len(trees) != 1:
        raise HarnessError(f"expected one linux-source-* tree in {src_root}, found {trees}")
    return trees[0]


def build_modules(kernel: Kernel, source: Path) -> None:
    extra = kernel.modules / "extra"
    if all((extra / f"{m}.ko").exists() for m in SIM_MODULES):
        return
    build = CACHE / "build" / kernel.release
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    for f in [*(source / "drivers/vdpa/vdpa_sim").glob("*.[ch]"), source / "drivers/vhost/vringh.c"]:
        shutil.copy(f, build)
    # Debian builds neither VDPA_SIM nor VHOST_RING: build vringh as well.
    (build / "Kbuild").write_text("obj-m := " + " ".join(f"{m}.o" for m in SIM_MODULES) + "\n")
    log("build " + ", ".join(SIM_MODULES))
    # CONFIG_DEBUG_INFO_BTF_MODULES= : module BTF would need pahole.
    run("make", "-s", "-C", kernel.headers, f"M={build}", f"-j{os.cpu_count()}",
        "CONFIG_DEBUG_INFO_BTF_MODULES=", "modules")
    vermagic = run(tool_path("modinfo") or "modinfo", "-F", "vermagic", build / "vdpa_sim.ko").stdout
    if not vermagic.startswith(kernel.release + " "):
        raise HarnessError(f"vdpa_sim.ko was built for {vermagic.strip()!r}, not {kernel.release}")
    extra.mkdir(exist_ok=True)
    for m in SIM_MODULES:
        shutil.copy(build / f"{m}.ko", extra)
    run(tool_path("depmod") or "depmod", "-b", kernel.root, kernel.release)


def build_initramfs(kernel: Kernel) -> Path:
    """A busybox initramfs; its name carries a hash of what goes into it."""
    init = (GUEST_FILES / "init").read_bytes()
    digest = hashlib.sha256(init + kernel.release.encode()).hexdigest()[:12]
    image = CACHE / f"initramfs-{digest}.cpio.gz"
    if image.exists():
        return image
    with tempfile.TemporaryDirectory(dir=CACHE) as tree_dir:
        tree = Path(tree_dir)
        for d in ("bin", "dev", "proc", "sys", "host", "rw", "newroot", "modules"):
            (tree / d).mkdir()
        shutil.copy(shutil.which("busybox"), tree / "bin" / "busybox")
        shutil.copy(GUEST_FILES / "init", tree / "init")
        (tree / "init").chmod(0o755)
        deps = run(tool_path("modprobe") or "modprobe", "-d", kernel.root, "-S", kernel.release,
                   "--show-depends", "-a", *INITRAMFS_MODULES).stdout
        order: list[str] = []
        for line in deps.splitlines():
            words = line.split()
            if words[:1] != ["insmod"]:
                continue
            name = Path(words[1]).name.split(".ko")[0]
            if name in order:
                continue
            order.append(name)
            # busybox insmod cannot read compressed modules.
            ko = Path(words[1]).read_bytes()
            if words[1].endswith(".xz"):
                ko = lzma.decompress(ko)
            (tree / "modules" / f"{name}.ko").write_bytes(ko)
        (tree / "modules" / "order").write_text("\n".join(order) + "\n")
        cpio = subprocess.Popen(["cpio", "-o", "-H", "newc", "--quiet"], cwd=tree,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        names = "\n".join(str(p.relative_to(tree)) for p in sorted(tree.rglob("*")))
        archive, _ = cpio.communicate(("." + "\n" + names + "\n").encode())
        if cpio.returncode:
            raise HarnessError("cpio failed building the initramfs")
        image.with_suffix(".tmp").write_bytes(gzip.compress(archive, compresslevel=1))
        image.with_suffix(".tmp").rename(image)
    return image


@contextlib.contextmanager
def cache_lock():
    """Serialise set-up between concurrent harness runs sharing one cache."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def prepare(refresh: bool = False) -> tuple[Kernel, Path]:
    started = time.monotonic()
    with cache_lock():
        ensure_host_tools()
        kernel = resolve_kernel(refresh)
        download(kernel)
        source = unpack(kernel)
        build_modules(kernel, source)
        initramfs = build_initramfs(kernel)
    log(f"ready in {time.monotonic() - started:.1f} s: {kernel.release}")
    return kernel, initramfs


# --------------------------------------------------------------------- run

@dataclass
class GuestRun:
    returncode: int  # the command's; 124 timed out; 255 the guest never said
    folder: Path  # run folder: console.log, out/

    @property
    def out(self) -> Path:
        return self.folder / "out"

    def console_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(FileNotFoundError):
            return "\n".join((self.folder / "console.log").read_text(errors="replace").splitlines()[-lines:])
        return "(no console log)"


def _pump(source: int, sink) -> threading.Thread:
    def copy() -> None:
        with os.fdopen(source, "rb", buffering=0) as stream:
            while chunk := stream.read(65536):
                sink.write(chunk)
                sink.flush()

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return thread


def boot(kernel: Kernel, initramfs: Path, command: list[str], *, cwd: Path,
         env: dict[str, str] | None = None, timeout: float = 1800,
         memory: str = "3G", cpus: int = 2, init: str = "sh") -> GuestRun:
    """Boot the guest, run `command` in `cwd`, stream its output here; `init` is one of INITS."""
    if init not in INITS:
        raise HarnessError(f"init {init!r} is not one of {', '.join(INITS)}")
    (CACHE / "runs").mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=CACHE / "runs"))
    folder.chmod(0o755)
    (folder / "out").mkdir()
    guest_env = {"VDPAD_IN_VM": "1", "VDPAD_VM_OUT": str(folder / "out"),
                 "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    for passed in ("CI", "VDPAD_LOG"):
        if passed in os.environ:
            guest_env.setdefault(passed, os.environ[passed])
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in guest_env.items())
    (folder / "command.sh").write_text(
        f"{exports}cd {shlex.quote(str(cwd))} || exit 127\n{shlex.join(command)}\n")
    (folder / "rc").write_text("")
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    # QEMU opens chardev paths with O_TRUNC: give it pipes, never our files.
    chardevs = []
    for name, path in (("stdout", f"/proc/self/fd/{out_w}"), ("stderr", f"/proc/self/fd/{err_w}"),
                       ("rc", str(folder / "rc"))):
        chardevs += ["-chardev", f"file,id={name},path={path}",
                     "-device", f"virtserialport,chardev={name},name=vdpad.{name}"]
    cmdline = (f"console=ttyS0 quiet loglevel=3 panic=-1 vdpad.run={folder} "
               f"vdpad.kmod={kernel.modules} vdpad.runner={GUEST_FILES / 'run.sh'}")
    if init == "systemd":
        cmdline += " vdpad.init=systemd " + " ".join(SYSTEMD_CMDLINE)
    qemu = [
        "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-M", "q35", "-cpu", os.environ.get("VDPAD_VM_CPU", "max"),
        "-smp", str(cpus), "-m", memory, "-nodefaults", "-no-user-config",
        "-display", "none", "-no-reboot", "-serial", f"file:{folder / 'console.log'}",
        "-kernel", str(kernel.image), "-initrd", str(initramfs), "-append", cmdline,
        "-fsdev", "local,id=host,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=host,mount_tag=host",
        "-fsdev", f"local,id=out,path={folder / 'out'},security_model=none",
        "-device", "virtio-9p-pci,fsdev=out,mount_tag=out",
        "-device", "virtio-serial-pci", *chardevs,
    ]
    log(f"boot {kernel.release}: {folder}")
    pumps = [_pump(out_r, sys.stdout.buffer), _pump(err_r, sys.stderr.buffer)]
    started = time.monotonic()
    try:
        proc = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(folder / "qemu.log", "wb"), pass_fds=(out_w, err_w))
    finally:
        os.close(out_w)
        os.close(err_w)
    try:
        proc.wait(timeout=timeout)
        code = (folder / "rc").read_text().strip()
        returncode = int(code) if code.isdigit() else 255
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        returncode = 124
    for pump in pumps:
        pump.join(timeout=10)
    log(f"guest exit {returncode} after {time.monotonic() - started:.1f} s")
    result = GuestRun(returncode, folder)
    if returncode in (124, 255):
        print(f"[vm] the guest {'timed out' if returncode == 124 else 'never reported'}; "
              f"console tail:\n{result.console_tail()}\nqemu: "
              f"{(folder / 'qemu.log').read_text(errors='replace')[-2000:]}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.vm.harness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    prep = sub.add_parser("prepare", help="install host tools, fetch and build the kernel side")
    prep.add_argument("--refresh", action="store_true", help="look up the newest kernel again")
    go = sub.add_parser("run", help="boot and run a command in the current directory")
    go.add_argument("--timeout", type=float, default=float(os.environ.get("VDPAD_VM_TIMEOUT", 1800)))
    go.add_argument("--memory", default=os.environ.get("VDPAD_VM_MEMORY", "3G"))
    go.add_argument("--init", choices=INITS, default="sh",
                    help="PID 1 of the guest: the runner itself (sh, the default) or systemd")
    go.add_argument("--collect", type=Path, metavar="DIR",
                    help="copy what the guest wrote to $VDPAD_VM_OUT into DIR afterwards")
    go.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        kernel, initramfs = prepare(getattr(args, "refresh", False))
    except HarnessError as error:
        print(f"[vm] set-up failed: {error}", file=sys.stderr)
        return 2
    if args.action == "prepare":
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("run needs a command")
    result = boot(kernel, initramfs, command, cwd=Path.cwd(), timeout=args.timeout,
                  memory=args.memory, init=args.init)
    if args.collect:
        shutil.copytree(result.out, args.collect, dirs_exist_ok=True)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
