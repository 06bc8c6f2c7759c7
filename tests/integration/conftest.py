"""Fixtures that boot the real image under QEMU; every failing test gets the serial console.

One image is built per session (cached across runs under the ukgpu cache by
input hash), and one guest serves the whole HTTP test module.  A test that
fails has each guest it touched attached to its report as a "serial console"
section, so the reason is visible without rerunning.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from ukgpu.kernel.image import build as image_mod
from ukgpu.kernel.image import qemu

_VMS_KEY = pytest.StashKey[list]()


def _need_host_tools() -> None:
    missing = [t for t in ("qemu-system-x86_64", "apt-get", "dpkg-deb") if not shutil.which(t)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: run tools/dev/host_deps.sh "
                    "(the image is built from Debian packages and booted with QEMU)")


@pytest.fixture(scope="session")
def built_image() -> image_mod.Image:
    _need_host_tools()
    return image_mod.build(image_mod.BuildConfig(model="smollm2-135m"))


@pytest.fixture
def attach_vm(request):
    """attach_vm(vm) -> vm: report `vm`'s serial console with this test if it fails."""

    def attach(vm: qemu.Vm) -> qemu.Vm:
        request.node.stash.setdefault(_VMS_KEY, []).append(vm)
        return vm

    return attach


@pytest.fixture
def refused_boot(attach_vm):
    """refused_boot(image) -> vm: boot `image`, which must refuse to serve: the guest powers
    itself off (QEMU exits 0, not a crash) without ever reporting READY."""

    def boot(image: image_mod.Image | qemu.Vm, raw: bool = False) -> qemu.Vm:
        """raw: the QEMU command another launcher would use (the image's own files and command
        line, no host record), so the guest checks everything itself.  A Vm: start that one."""
        if isinstance(image, qemu.Vm):
            vm = attach_vm(image)
        else:
            vm = attach_vm(qemu.Vm(image, qemu.BootOptions(port=0, verify=not raw)))
        if raw:
            vm.command = qemu.qemu_command(image, qemu.BootOptions(port=0), vm.port)
        vm.start()
        try:
            code = vm.wait(timeout=420)
        except subprocess.TimeoutExpired:
            vm.kill()
            pytest.fail("the guest neither refused nor powered off:\n" + vm.tail())
        assert code == 0, "the guest should power itself off, not crash QEMU"
        assert vm.ready is None, "a refused guest must never report READY"
        return vm

    return boot


@pytest.fixture(scope="module")
def serving_vm(built_image, request):
    """A guest booted from the session image, READY, serving on a free host port."""
    vm = qemu.Vm(built_image, qemu.BootOptions(port=0))
    vm.start()
    request.session.stash.setdefault(_VMS_KEY, []).append(vm)
    try:
        vm.wait_ready(timeout=420)
        yield vm
    finally:
        vm.kill()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.passed or report.skipped:
        return
    vms = list(item.stash.get(_VMS_KEY, []))
    if "serving_vm" in getattr(item, "fixturenames", ()):
        vms += item.session.stash.get(_VMS_KEY, [])
    for vm in dict.fromkeys(vms):
        report.sections.append((f"serial console (port {vm.port})", vm.tail(200)))
