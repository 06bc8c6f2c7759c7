"""The dm-verity hash trees the image builder appends, against cryptsetup's `veritysetup format`
(the reference implementation the kernel's dm-verity is tested with), and stage 1's device-mapper
requests against the kernel's struct layout (linux/dm-ioctl.h)."""

import hashlib
import shutil
import struct
import subprocess

import pytest

from ukgpu.kernel.guest import stage1
from ukgpu.kernel.image import verity

SALT = hashlib.sha256(b"test salt").digest()


def _veritysetup(data, tmp_path):
    tool = shutil.which("veritysetup")
    if tool is None:
        pytest.skip("veritysetup not installed: run tools/dev/host_deps.sh --tests (cryptsetup-bin)")
    hashes = tmp_path / "hashes"
    res = subprocess.run([tool, "format", "--no-superblock", "--hash=sha256", f"--salt={SALT.hex()}",
                          str(data), str(hashes)],
                         capture_output=True, text=True, check=True)
    root = next(line.split(":", 1)[1].strip() for line in res.stdout.splitlines() if line.startswith("Root hash"))
    return root, hashes.read_bytes()


# 1 block: no hash levels; 128: one full level; 129: two levels; 20,000: three, with padding
@pytest.mark.parametrize("size", [100, 4096, 128 * 4096, 129 * 4096 - 7, 20_000 * 4096 + 1])
def test_tree_and_root_hash_match_veritysetup_byte_for_byte(tmp_path, size):
    data = tmp_path / "data"
    payload = hashlib.shake_256(str(size).encode()).digest(size)
    data.write_bytes(payload)
    ours = tmp_path / "ours"
    got = verity.copy_with_tree(data, ours, SALT, "sha256")
    blocks = -(-size // 4096)
    assert got.data_blocks == blocks and got.salt == SALT.hex()
    padded = payload.ljust(blocks * 4096, b"\0")
    written = ours.read_bytes()
    assert written[:blocks * 4096] == padded
    data.write_bytes(padded)  # veritysetup wants whole blocks
    root, tree = _veritysetup(data, tmp_path)
    assert got.root_hash == root
    assert written[blocks * 4096:] == tree


def test_blake2b_trees_are_the_same_construction_with_the_other_hash(tmp_path):
    """veritysetup's userspace has no BLAKE2b-256 (the kernel has): the tree is checked by
    building it the kernel's way by hand; the guest's kernel checks the real thing at boot."""
    data = tmp_path / "data"
    payload = hashlib.shake_256(b"b2").digest(245 * 4096)
    data.write_bytes(payload)
    got = verity.copy_with_tree(data, tmp_path / "ours", SALT)
    assert got.algorithm == "blake2b-256"

    def h(raw):
        return hashlib.blake2b(SALT + raw, digest_size=32).digest()

    level0 = b"".join(h(payload[i:i + 4096]) for i in range(0, len(payload), 4096))
    blocks = [level0[i:i + 4096].ljust(4096, b"\0") for i in range(0, len(level0), 4096)]  # 2 blocks
    top = b"".join(h(b) for b in blocks).ljust(4096, b"\0")
    assert got.root_hash == h(top).hex()
    assert (tmp_path / "ours").read_bytes()[245 * 4096:] == top + b"".join(blocks)


def test_a_flipped_data_byte_changes_the_root_hash(tmp_path):
    data = tmp_path / "data"
    data.write_bytes(bytes(300 * 4096))
    first = verity.copy_with_tree(data, tmp_path / "a", SALT)
    data.write_bytes(bytes(150 * 4096) + b"\1" + bytes(150 * 4096 - 1))
    assert verity.copy_with_tree(data, tmp_path / "b", SALT).root_hash != first.root_hash


def test_disk_words_round_trip_and_bad_ones_are_refused():
    v = verity.Verity(245, "ab" * 32, "cd" * 32)
    assert stage1.parse_disk(v.word()) == (245, "ab" * 32, "cd" * 32, "blake2b-256")
    assert set(stage1.HASHES) == set(verity.HASHES)  # what the host writes, the guest can map
    assert stage1.parse_disk(f"245:{'ab' * 32}:cd:sha256")[3] == "sha256"
    for bad in ("", "245:ab", "0:" + "ab" * 32 + ":cd:sha256", "x:" + "ab" * 32 + ":cd:sha256",
                "245:abcd:cd:sha256", "245:" + "ab" * 32 + ":cd", "245:" + "ab" * 32 + ":cd:md5"):
        with pytest.raises(stage1.StageError, match="bad disk description"):
            stage1.parse_disk(bad)


def test_stage1_takes_each_disk_word_once_and_needs_the_root():
    words = stage1.parse_cmdline("console=ttyS0 ukgpu.root=1:" + "ab" * 32 + ":00 ukgpu.manifest=x")
    assert words == {"ukgpu.root": "1:" + "ab" * 32 + ":00"}
    with pytest.raises(stage1.StageError, match="appears twice"):
        stage1.parse_cmdline("ukgpu.root=a ukgpu.root=b")
    with pytest.raises(stage1.StageError, match="appears twice"):
        stage1.parse_cmdline("ukgpu.root=a ukgpu.verify=host ukgpu.verify=off")
    with pytest.raises(stage1.StageError, match="no ukgpu.root="):
        stage1.parse_cmdline("console=ttyS0 ukgpu.verify=off")


def test_verity_table_points_data_and_tree_at_one_disk():
    start, sectors, kind, params = stage1.verity_table(245, "254:0", "ab" * 32, "cd" * 32, "sha256")
    assert (start, sectors, kind) == (0, 245 * 8, "verity")
    assert params == f"1 254:0 254:0 4096 4096 245 245 sha256 {'ab' * 32} {'cd' * 32}"
    assert stage1.linear_table(245, "254:0") == (0, 245 * 8, "linear", "254:0 0")


def test_device_mapper_requests_follow_the_kernels_struct_layout():
    assert stage1._DM_HEADER.size == 312 and stage1._DM_TARGET.size == 40
    # _IOWR(0xfd, 9, struct dm_ioctl) as libdevmapper computes it: DM_TABLE_LOAD
    assert stage1.dm_request(9) == 0xC138FD09
    target = stage1.verity_table(245, "254:0", "ab" * 32, "cd" * 32)
    buf = stage1.dm_buffer("ukgpu-root", 1, [target])
    version = struct.unpack_from("=3I", buf)
    size, start, count, _open, flags = struct.unpack_from("=IIIiI", buf, 12)
    assert version == (4, 0, 0) and start == 312 and count == 1 and flags == 1
    assert size == len(buf) and size % 8 == 0
    assert bytes(buf[48:48 + 10]) == b"ukgpu-root" and buf[58] == 0
    sector, length, _status, nxt, kind = stage1._DM_TARGET.unpack_from(buf, 312)
    assert (sector, length, kind.rstrip(b"\0")) == (0, 245 * 8, b"verity")
    params = bytes(buf[312 + 40:312 + nxt]).rstrip(b"\0").decode()
    assert params == target[3] and nxt % 8 == 0
    buf[40:48] = struct.pack("=Q", (254 << 8) | 3)  # what the kernel answers in `dev`
    assert stage1.dm_dev(buf) == (254 << 8) | 3
