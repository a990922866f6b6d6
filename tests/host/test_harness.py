"""The VM harness's pure parts: where packages come from, what gets fetched."""

import pytest

from tests.vm.harness import HarnessError, Kernel, debian_mirror, newest_kernel

DEB822 = """Types: deb
URIs: http://mirror.invalid/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.invalid/debian-security
Suites: bookworm-security
Components: main
"""


def test_mirror_from_deb822(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    assert debian_mirror(tmp_path) == "http://mirror.invalid/debian"


def test_mirror_from_one_line_sources(tmp_path):
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb http://sec.invalid/debian-security bookworm-security main\n"
        "deb [arch=amd64] http://other.invalid/debian bookworm main\n")
    assert debian_mirror(tmp_path) == "http://other.invalid/debian"


def test_mirror_security_only_is_an_error(tmp_path):
    (tmp_path / "sources.list").write_text("deb http://sec.invalid/debian-security bookworm-security main\n")
    with pytest.raises(HarnessError, match="no Debian mirror"):
        debian_mirror(tmp_path)


def test_newest_kernel_picks_highest_version():
    show = ("Package: linux-image-amd64\nVersion: 6.11.1-1~bpo12+1\n"
            "Depends: linux-image-6.11.1+deb12-amd64 (= 6.11.1-1~bpo12+1)\n\n"
            "Package: linux-image-amd64\nVersion: 6.12.95-1~bpo12+1\n"
            "Depends: linux-image-6.12.95+deb12-amd64 (= 6.12.95-1~bpo12+1)\n")
    kernel = newest_kernel(show)
    assert kernel == Kernel("6.12.95+deb12-amd64", "6.12.95-1~bpo12+1")
    assert kernel.packages == [
        "linux-image-6.12.95+deb12-amd64", "linux-headers-6.12.95+deb12-amd64",
        "linux-headers-6.12.95+deb12-common", "linux-kbuild-6.12.95+deb12", "linux-source-6.12"]


def test_newest_kernel_without_image_is_an_error():
    with pytest.raises(HarnessError, match="names no kernel image"):
        newest_kernel("Package: linux-image-amd64\nDepends: initramfs-tools\n")

