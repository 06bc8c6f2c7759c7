"""deploy/helm/ukgpu: `helm lint` and `helm template` with the values `ukgpu image export` writes,
and every rendered object validated offline (tests/unit/deploy_checks.py): KubeVirt and
InferencePool strictly against deploy/schemas/, core kinds with kubernetes-validate.  Planted
typos, in a rendered object and in a template, must fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
from deploy_checks import CHART, helm, misspell, render, validate
from test_oci_export import fake_image

from ukgpu.kernel.image import build, export

REPOS = {"repository": {"boot": "registry.example/ml/ukgpu-boot", "rootDisk": "registry.example/ml/ukgpu-root",
                        "modelDisk": "registry.example/ml/ukgpu-model"}}
VARIANTS = {
    "cpu, embedded model": (False, ()),
    "gpu, model disk, inference pool": (True, ("gpu.enabled=true", "inferencePool.enabled=true")),
    "external picker": (True, ("inferencePool.enabled=true", "inferencePool.picker.deploy=false")),
}


def values_for(tmp_path: Path, disk: bool) -> list[Path]:
    """kernel-args.json of a real export (of a tiny fake image) + where the images were pushed."""
    image = build.load(fake_image(tmp_path / "img", disk=disk))
    done = export.export_oci(image, tmp_path / "oci", log=lambda m: None)
    repos = tmp_path / "repos.json"
    repos.write_text(json.dumps(REPOS))
    return [done.dir / export.ARGS_JSON, repos]


def by_kind(objects: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for obj in objects:
        out.setdefault(obj["kind"], []).append(obj)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chart_lints_renders_and_every_object_validates(tmp_path, variant):
    disk, sets = VARIANTS[variant]
    values = values_for(tmp_path, disk)
    lint = helm("lint", str(CHART), "--strict", *[a for v in values for a in ("-f", str(v))],
                *[a for s in sets for a in ("--set", s)])
    assert lint.returncode == 0, lint.stdout + lint.stderr
    objects = render(CHART, values, sets)
    checked = {f"{o['kind']}/{o['metadata']['name']}": validate(o) for o in objects}
    kinds = by_kind(objects)
    assert set(kinds) >= {"VirtualMachinePool", "Service"}
    assert checked["VirtualMachinePool/r1-ukgpu"].startswith("kubevirt")
    if "inferencePool.enabled=true" in sets:
        assert checked["InferencePool/r1-ukgpu"] == "inferencepool crd"
        assert ("Deployment" in kinds) == ("inferencePool.picker.deploy=false" not in sets)
    else:
        assert "InferencePool" not in kinds


def test_the_guest_gets_what_the_export_says(tmp_path):
    values = values_for(tmp_path, disk=True)
    args = json.loads(values[0].read_text())
    objects = by_kind(render(CHART, values, ("gpu.enabled=true", "gpu.count=2", "extraKernelArgs={ukgpu.slots=4}")))
    (pool,) = objects["VirtualMachinePool"]
    vmi = pool["spec"]["virtualMachineTemplate"]["spec"]["template"]["spec"]
    boot = vmi["domain"]["firmware"]["kernelBoot"]
    assert boot["kernelArgs"] == args["kernelArgs"] + " ukgpu.slots=4"
    assert boot["container"] == {"image": f"registry.example/ml/ukgpu-boot@{args['images']['boot']}",
                                 "kernelPath": "/boot/vmlinux", "initrdPath": "/boot/initramfs",
                                 "imagePullPolicy": "IfNotPresent"}
    root, volume = vmi["volumes"]
    assert root["containerDisk"]["image"] == f"registry.example/ml/ukgpu-root@{args['images']['root-disk']}"
    assert root["containerDisk"]["path"] == args["rootDiskPath"] == "/disk/root.img"
    assert volume["containerDisk"]["image"] == f"registry.example/ml/ukgpu-model@{args['images']['model-disk']}"
    assert volume["containerDisk"]["path"] == args["model"]["diskPath"]
    # stage 1 finds the disks by these serials, whatever order the hypervisor attaches them in
    assert vmi["domain"]["devices"]["disks"] == [
        {"name": "root", "serial": "ukgpu-root", "disk": {"bus": "virtio", "readonly": True}},
        {"name": "model", "serial": "ukgpu-model", "disk": {"bus": "virtio", "readonly": True}}]
    (nic,) = vmi["domain"]["devices"]["interfaces"]
    assert nic["masquerade"] == {} and nic["ports"][0]["port"] == 8080
    assert [g["name"] for g in vmi["domain"]["devices"]["gpus"]] == ["gpu0", "gpu1"]
    for probe in (vmi["readinessProbe"], vmi["livenessProbe"]):
        assert probe["httpGet"]["path"] == "/health" and probe["httpGet"]["port"] == 8080
    selector = pool["spec"]["selector"]["matchLabels"]
    (service,) = objects["Service"]
    assert service["spec"]["selector"] == selector  # the Service reaches the pool's guests
    assert pool["spec"]["virtualMachineTemplate"]["spec"]["template"]["metadata"]["labels"].items() >= selector.items()
    assert "proactive" in pool["spec"]["updateStrategy"]


def test_missing_guest_values_are_refused_with_the_fix(tmp_path):
    done = helm("template", "r1", str(CHART))
    assert done.returncode != 0 and "kernel-args.json" in done.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**REPOS, "kernelArgs": "console=ttyS0", "images": {"boot": "sha256:00"}}))
    done = helm("template", "r1", str(CHART), "-f", str(bad))
    assert done.returncode != 0 and "ukgpu.manifest=" in done.stderr


TYPOS = [  # (kind, path of the key to misspell, new name)
    ("VirtualMachinePool", ("spec", "virtualMachineTemplate", "spec", "template", "spec", "domain", "firmware",
                            "kernelBoot", "kernelArgs"), "kernelArg"),
    ("VirtualMachinePool", ("spec", "virtualMachineTemplate", "spec", "template", "spec", "readinessProbe",
                            "httpGet", "path"), "pth"),
    ("VirtualMachinePool", ("spec", "updateStrategy", "proactive"), "proactiv"),
    ("VirtualMachinePool", ("metadata", "labels"), "lables"),
    ("InferencePool", ("spec", "targetPorts"), "targetPort"),
    ("Service", ("spec", "selector"), "selecter"),
]


@pytest.mark.parametrize("kind, path, new", TYPOS, ids=[t[2] for t in TYPOS])
def test_a_misspelt_field_fails_validation(tmp_path, kind, path, new):
    objects = by_kind(render(CHART, values_for(tmp_path, disk=True), ("inferencePool.enabled=true",)))
    (good,) = [o for o in objects[kind] if o["metadata"]["name"] == "r1-ukgpu"]
    validate(good)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError), match=new):
        validate(misspell(good, path, new))


def test_a_typo_in_a_template_fails(tmp_path):
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    template = chart / "templates" / "vmpool.yaml"
    text = template.read_text()
    assert text.count("masquerade: {}") == 1
    template.write_text(text.replace("masquerade: {}", "masquarade: {}"))
    (pool,) = by_kind(render(chart, values_for(tmp_path, disk=False)))["VirtualMachinePool"]
    with pytest.raises(jsonschema.ValidationError, match="masquarade"):
        validate(pool)


@pytest.mark.parametrize("typo", ["gpu.enable=true", "probes.readiness.periodSecond=5", "inferencePool.picker.weight.queue=1"])
def test_a_misspelt_value_is_refused_by_the_values_schema(tmp_path, typo):
    args = [a for v in values_for(tmp_path, disk=False) for a in ("-f", str(v))]
    assert helm("template", "r1", str(CHART), *args).returncode == 0
    done = helm("template", "r1", str(CHART), *args, "--set", typo)
    assert done.returncode != 0 and "not allowed" in done.stderr, done.stderr
