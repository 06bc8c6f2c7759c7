"""Record a machine's PCI sysfs facts into tests/data/sysfs/<name>/ (see sysfs_tree.py for the format).

    python tests/data/sysfs/record.py dev-vm                              # this machine's /sys
    python tests/data/sysfs/record.py --from-guest-log serial.log qemu-edu  # the VFIO test guest's
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
from pathlib import Path

from sysfs_tree import ATTRS, HERE


def record(name: str, sysfs: Path = Path("/sys")) -> Path:
    out = HERE / name / "devices"
    shutil.rmtree(out, ignore_errors=True)
    for dev in sorted((sysfs / "bus/pci/devices").iterdir()):
        dest = out / dev.name.replace(":", "_")  # no colons in checked-in paths
        dest.mkdir(parents=True)
        for attr in ATTRS:
            if (dev / attr).is_file():
                (dest / attr).write_bytes((dev / attr).read_bytes())
        links = [f"{link} {os.path.basename(os.readlink(dev / link))}"
                 for link in ("driver", "iommu_group") if (dev / link).is_symlink()]
        for kind in ("drm", "net", "block"):  # class devices the host made, directly or one level down
            names = sorted(p.name for pattern in (kind, f"*/{kind}") for d in dev.glob(pattern) for p in d.iterdir())
            if names:
                links.append(f"{kind} " + " ".join(names))
        (dest / "links").write_text("".join(line + "\n" for line in links))
    return out


def record_guest_log(log: Path, name: str) -> Path:
    """From the `UKGPU_VFIO_RESULT` line of a VFIO test guest's serial log (its "sysfs" facts)."""
    line = [x for x in log.read_text().splitlines() if x.startswith("UKGPU_VFIO_RESULT ")][-1]
    facts = json.loads(line.split(" ", 1)[1])["sysfs"]
    out = HERE / name / "devices"
    shutil.rmtree(out, ignore_errors=True)
    for bdf, entry in facts.items():
        dest = out / bdf.replace(":", "_")
        dest.mkdir(parents=True)
        for attr, data in entry["attrs"].items():
            (dest / attr).write_bytes(base64.b64decode(data))
        (dest / "links").write_text("".join(f"{k} {v}\n" for k, v in entry["links"].items()))
    return out


if __name__ == "__main__":
    if sys.argv[1] == "--from-guest-log":
        print(record_guest_log(Path(sys.argv[2]), sys.argv[3]))
    else:
        print(record(sys.argv[1]))
