"""PID 1 of the VFIO test guest (build.py prepends the `#!` line).

Mounts /proc, /sys and /dev, loads the VFIO modules, binds the edu device to
vfio-pci with `ukgpu.gpu.vfio.host`, runs `edu_check.run`, prints one line
`UKGPU_VFIO_RESULT <json>` and powers off.  Any exception becomes a result
with "error" set, so the host test always has something to parse.
"""

import ctypes
import json
import os
import sys
import time
import traceback

LIBC = ctypes.CDLL(None, use_errno=True)
SYS_FINIT_MODULE = 313  # x86_64
RB_POWER_OFF = 0x4321FEDC
MODULES = "/lib/vfio-modules"
EDU_IDS = ("0x1234", "0x11e8")
SYSFS_ATTRS = ("config", "resource", "vendor", "device", "class", "revision", "subsystem_vendor",
               "subsystem_device", "numa_node")


def mount(source: str, target: str, fstype: str) -> None:
    if LIBC.mount(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        raise OSError(ctypes.get_errno(), f"mount {fstype} on {target}")


def load_modules() -> list[str]:
    loaded = []
    for name in sorted(os.listdir(MODULES)):
        fd = os.open(os.path.join(MODULES, name), os.O_RDONLY)
        try:
            if LIBC.syscall(SYS_FINIT_MODULE, fd, b"", 0) != 0:
                raise OSError(ctypes.get_errno(), f"finit_module {name}")
        finally:
            os.close(fd)
        loaded.append(name)
    return loaded


def find_edus() -> list[str]:
    """Every edu device, by address: the first is on the root bus, alone in its IOMMU group."""
    root = "/sys/bus/pci/devices"
    found = [bdf for bdf in sorted(os.listdir(root))
             if tuple(open(f"{root}/{bdf}/{f}").read().strip() for f in ("vendor", "device")) == EDU_IDS]
    if not found:
        raise RuntimeError("no edu device (1234:11e8): start QEMU with -device edu")
    return found


def not_viable_check(host, bdf: str) -> dict:
    """Bind an edu that shares its IOMMU group with a device a host driver owns; opening must fail."""
    from ukgpu.gpu.vfio.device import VfioError, open_device

    plan = host.plan_bind(bdf)
    out = {"bdf": bdf, "others": plan.others}
    plan.apply()
    wait_for(f"/dev/vfio/{host.bus.device(bdf).iommu_group}")
    try:
        open_device(bdf).close()
        out["error"] = "opened"
    except VfioError as exc:
        out["error"] = str(exc)
    return out


def wait_for(path: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def sysfs_facts() -> dict:
    """Every PCI device's sysfs attributes (base64) and links, for tests/data/sysfs/record.py."""
    import base64
    root, facts = "/sys/bus/pci/devices", {}
    for bdf in sorted(os.listdir(root)):
        entry = {"attrs": {}, "links": {}}
        for attr in SYSFS_ATTRS:
            path = f"{root}/{bdf}/{attr}"
            if os.path.isfile(path):
                entry["attrs"][attr] = base64.b64encode(open(path, "rb").read()).decode()
        for link in ("driver", "iommu_group"):
            if os.path.islink(f"{root}/{bdf}/{link}"):
                entry["links"][link] = os.path.basename(os.readlink(f"{root}/{bdf}/{link}"))
        facts[bdf] = entry
    return facts


def main() -> dict:
    t0 = time.monotonic()
    mount("proc", "/proc", "proc")
    mount("sysfs", "/sys", "sysfs")
    mount("devtmpfs", "/dev", "devtmpfs")
    sys.path.insert(0, "/opt")
    import edu_check

    from ukgpu.gpu.vfio.device import VfioError, open_device
    from ukgpu.gpu.vfio.host import VfioHost

    result = {"modules": load_modules()}
    bdf, *shared_edus = find_edus()
    try:  # not bound yet: the error must say how to fix it
        open_device(bdf).close()
        result["error_before_bind"] = "opened"
    except VfioError as exc:
        result["error_before_bind"] = str(exc)
    host = VfioHost("/sys", "/proc")
    plan = host.plan_bind(bdf)
    result["bind_writes"] = [str(w) for w in plan.writes]
    plan.apply()
    result["driver_after_bind"] = host.bus.device(bdf).driver
    group = host.bus.device(bdf).iommu_group
    wait_for(f"/dev/vfio/{group}")
    result["setup_s"] = round(time.monotonic() - t0, 3)
    if "intremap=off" in open("/proc/cmdline").read().split():
        try:  # without interrupt remapping type1 refuses the container: the error must say so
            open_device(bdf).close()
            result["no_intremap_error"] = "opened"
        except VfioError as exc:
            result["no_intremap_error"] = str(exc)
        return result
    result["sysfs"] = sysfs_facts()
    if shared_edus:
        result["not_viable"] = not_viable_check(host, shared_edus[0])
    result.update(edu_check.run(bdf))
    unbind = host.plan_unbind(bdf)
    result["unbind_writes"] = [str(w) for w in unbind.writes]
    unbind.apply()
    result["driver_after_unbind"] = host.bus.device(bdf).driver
    result["group_file_after_unbind"] = os.path.exists(f"/dev/vfio/{group}")
    return result


if __name__ == "__main__":
    try:
        outcome = main()
    except BaseException as exc:  # report everything: the host test parses this line
        outcome = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    print("UKGPU_VFIO_RESULT " + json.dumps(outcome), flush=True)
    os.sync()
    LIBC.reboot(RB_POWER_OFF)
