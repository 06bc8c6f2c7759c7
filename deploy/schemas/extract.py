"""Cut the definitions the chart's KubeVirt objects use out of KubeVirt's OpenAPI spec.

    python deploy/schemas/extract.py PATH/TO/kubevirt/api/openapi-spec/swagger.json

writes deploy/schemas/kubevirt-<commit>-pool.json: `v1beta1.VirtualMachinePool` and every
definition it reaches through `$ref`, unchanged (descriptions included), so the tests validate
offline against exactly what KubeVirt publishes.  The commit is the one named in SOURCE below.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SOURCE = "kubevirt/kubevirt api/openapi-spec/swagger.json @ d923fdb"
ROOTS = ("v1beta1.VirtualMachinePool",)
OUT = Path(__file__).with_name("kubevirt-d923fdb-pool.json")


def _refs(node: object):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value.rsplit("/", 1)[-1]
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def closure(definitions: dict, roots: tuple[str, ...]) -> dict:
    seen: dict = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen[name] = definitions[name]
            todo.extend(_refs(seen[name]))
    return dict(sorted(seen.items()))


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    doc = {"source": SOURCE, "roots": list(ROOTS), "definitions": closure(spec["definitions"], ROOTS)}
    OUT.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"{OUT}: {len(doc['definitions'])} definitions")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
