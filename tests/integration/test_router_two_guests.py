"""The data plane of deploy/ without a cluster: guests booted from the files taken back out of the
exported OCI image, with the kernel arguments the Helm chart renders, behind a real router from
PyPI (vllm-router, round robin) on loopback.

QEMU's user network is set up like KubeVirt's masquerade binding (guest 10.0.2.2, gateway
10.0.2.1), since those are the addresses the rendered kernel arguments give the guest.  One test,
in order: readiness gating (the router serves only once both guests answer /health), requests
spread over both, one guest killed and traffic going on, a rolling replacement (boot a third,
wait for READY, add it, remove the old one) under a steady request loop, with no failed request.
Bounded loops and one-token answers: every token costs seconds under TCG.  The numbers are
printed (pytest -s) and recorded in docs/deploy.md.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ukgpu.kernel.image import export, oci, qemu
from ukgpu.kernel.image.build import Image
from ukgpu.kernel.image.debs import cache_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from deploy_checks import CHART, fetch_wheel, render  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROUTER_WHEEL = "vllm-router==0.1.17"
ROUTER_WHEEL_SHA256 = "85c96bea4d573a49b5a8ae4c72ee3dfe733aba26b6f1ff1256e6142f1f42694d"
MASQUERADE_NET = "user,id=n0,net=10.0.2.0/24,host=10.0.2.1,hostfwd=tcp:127.0.0.1:{port}-10.0.2.2:8080"
LAUNCH = """
import sys
from vllm_router.router import Router
from vllm_router.router_args import RouterArgs
Router.from_args(RouterArgs(
    worker_urls=sys.argv[2:], host="127.0.0.1", port=int(sys.argv[1]), policy="round_robin",
    worker_startup_timeout_secs=900, worker_startup_check_interval=1, health_check_interval_secs=2,
    health_check_timeout_secs=60, health_failure_threshold=2, health_success_threshold=1,
    request_timeout_secs=600, log_level="info")).start()
"""
BODY = {"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 1, "temperature": 0}
_SERVED = re.compile(r'^ukgpu_requests_total\{path="/v1/completions",status="200"\} (\d+)$', re.M)


@dataclass
class BootFiles:
    image: Image  # vmlinux + initramfs as taken out of the boot image
    kernel_args: str  # as the chart renders them into the VirtualMachinePool


@pytest.fixture(scope="module")
def boot_files(built_image, tmp_path_factory) -> BootFiles:
    tmp = tmp_path_factory.mktemp("oci")
    done = export.export_oci(built_image, tmp / "oci", log=lambda m: None)
    repos = tmp / "repos.json"
    repos.write_text(json.dumps({"repository": {"boot": "r.example/boot", "rootDisk": "r.example/root",
                                                "modelDisk": "r.example/model"}}))
    (pool,) = [o for o in render(CHART, [done.dir / export.ARGS_JSON, repos]) if o["kind"] == "VirtualMachinePool"]
    boot = pool["spec"]["virtualMachineTemplate"]["spec"]["template"]["spec"]["domain"]["firmware"]["kernelBoot"]
    files = tmp / "boot"
    files.mkdir()
    layer = oci.read_index(done.dir)["boot"]["layers"][0]
    with tarfile.open(oci.blob_path(done.dir, layer)) as tar:
        for member, name in ((boot["container"]["kernelPath"], "vmlinux"), (boot["container"]["initrdPath"], "initramfs")):
            src = tar.extractfile(member.lstrip("/"))
            assert src is not None, f"{member} is not in the boot image"
            with open(files / name, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    root_path = pool["spec"]["virtualMachineTemplate"]["spec"]["template"]["spec"]["volumes"][0]["containerDisk"]["path"]
    layer = oci.read_index(done.dir)["root-disk"]["layers"][0]
    with tarfile.open(oci.blob_path(done.dir, layer)) as tar:
        src = tar.extractfile(root_path.lstrip("/"))
        assert src is not None, f"{root_path} is not in the root-disk image"
        with open(files / "root.img", "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
    shutil.rmtree(done.dir)  # ~0.5 GB; the files taken out are all the guests need
    info = dict(built_image.info, kernel="vmlinux", initramfs="initramfs", cmdline=boot["kernelArgs"],
                disks={"root": "root.img"})
    return BootFiles(Image(files, info), boot["kernelArgs"])


def guest(files: BootFiles, attach_vm) -> qemu.Vm:
    """A guest booted like KubeVirt would: exactly the rendered kernel arguments, masquerade addressing."""
    vm = attach_vm(qemu.Vm(files.image, qemu.BootOptions(port=0, verify=False)))
    cmd = list(vm.command)
    cmd[cmd.index("-append") + 1] = files.kernel_args  # no ukgpu.verify=off: the guest checks itself
    cmd[cmd.index("-netdev") + 1] = MASQUERADE_NET.format(port=vm.port)
    vm.command = cmd
    return vm.start()


class Router:
    def __init__(self, workers: list[str], log: Path) -> None:
        site = cache_dir() / "tools" / "vllm-router-0.1.17"
        if not (site / "vllm_router_rs.abi3.so").exists():
            zipfile.ZipFile(io.BytesIO(fetch_wheel(ROUTER_WHEEL, ROUTER_WHEEL_SHA256))).extractall(site)
        self.port = qemu.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ, PYTHONPATH=str(site))
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", LAUNCH, str(self.port), *workers], env=env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def serving(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def call(self, verb: str, url: str) -> None:
        resp = httpx.post(f"{self.url}/{verb}", params={"url": url}, timeout=30)
        assert resp.status_code == 200, f"{verb} {url}: {resp.status_code} {resp.text}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def complete(router: Router) -> str:
    """One request through the router: "200" or what went wrong."""
    try:
        resp = httpx.post(router.url + "/v1/completions", json=BODY, timeout=600)
    except httpx.HTTPError as exc:
        return type(exc).__name__
    return str(resp.status_code) if resp.status_code != 200 or resp.json()["choices"] else "200 empty"


def served(vm: qemu.Vm) -> int:
    match = _SERVED.search(httpx.get(vm.url + "/metrics", timeout=60).text)
    return int(match.group(1)) if match else 0


def test_two_guests_behind_a_router(boot_files, attach_vm, tmp_path):
    t0 = time.monotonic()
    a, b = guest(boot_files, attach_vm), guest(boot_files, attach_vm)
    router = Router([a.url, b.url], tmp_path / "router.log")
    try:
        _scenario(boot_files, attach_vm, a, b, router, t0)
    except BaseException:
        print("router log:\n" + router.log.read_text()[-4000:])
        raise
    finally:
        router.close()
        for vm in (a, b):
            vm.kill()


def _scenario(files: BootFiles, attach_vm, a: qemu.Vm, b: qemu.Vm, router: Router, t0: float) -> None:
    early = router.serving()
    ready = [vm.wait_ready(timeout=900)["host_seconds"] for vm in (a, b)]
    deadline = time.monotonic() + 300
    while not router.serving():
        assert time.monotonic() < deadline, "the router never started serving the two ready guests"
        time.sleep(0.5)
    router_at = time.monotonic() - t0
    assert not early, "the router served before its guests were up"
    assert router_at >= max(ready) - 2.0, (router_at, ready)  # gated on both guests' /health
    print(f"\nguests READY after {ready[0]:.1f} s / {ready[1]:.1f} s; router serving at {router_at:.1f} s")

    began = time.monotonic()
    spread = [complete(router) for _ in range(4)]
    counts = {"a": served(a), "b": served(b)}
    assert spread == ["200"] * 4 and counts["a"] >= 1 and counts["b"] >= 1, (spread, counts)
    print(f"spread: 4 requests ({(time.monotonic() - began) / 4:.1f} s each), per guest {counts}")

    a.kill()  # a guest lost without warning: the router must route around it
    after_kill = [complete(router) for _ in range(3)]
    assert after_kill == ["200"] * 3, after_kill
    assert served(b) == counts["b"] + 3
    print(f"after killing one guest: {after_kill.count('200')}/3 answered by the other")

    results: list[str] = []
    stop = threading.Event()

    def steady_load() -> None:
        while not stop.is_set() and len(results) < 60:  # bounded even if a wait below hangs
            results.append(complete(router))

    load = threading.Thread(target=steady_load, daemon=True)
    load.start()
    started = time.monotonic()
    c = guest(files, attach_vm)
    try:
        c_ready = c.wait_ready(timeout=900)["host_seconds"]
        router.call("add_worker", c.url)
        before = len(results)
        _wait(lambda: served(c) >= 1 or len(results) >= before + 4, 900, "the new guest never got a request")
        router.call("remove_worker", b.url)
        removed_at = len(results)
        _wait(lambda: len(results) >= removed_at + 2, 900, "requests stopped after the old guest left")
        stop.set()
        load.join(900)
        assert served(c) >= 1, "the new guest served nothing"
        assert results and all(r == "200" for r in results), results
        print(f"rolling replacement: new guest READY in {c_ready:.1f} s, {len(results)} requests during "
              f"{time.monotonic() - started:.0f} s, {sum(r != '200' for r in results)} failed, "
              f"{served(c)} served by the new guest")
    finally:
        stop.set()
        c.kill()


def _wait(predicate, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, message
        time.sleep(1)
