"""`ukgpu verify`'s kernel level covers the whole manifest: every entry (the newer families'
scaled rope of head sizes up to 256, sliding-window attention of every head size, geglu,
scale, per-head norms included) is launched by some check, and all pass on the fake driver."""

from __future__ import annotations

from ukgpu.gpu.cuda.arena import DeviceArena
from ukgpu.gpu.cuda.driver import open_device
from ukgpu.gpu.cuda.modules import KernelSet
from ukgpu.gpu.cuda.verify_kernels import kernel_checks

from fakes.cuda_driver import FakeDriver


def test_kernel_checks_launch_every_manifest_entry_and_pass():
    ctx = open_device(0, FakeDriver())
    kernels = KernelSet(ctx)
    arena = DeviceArena(ctx.cu, 256 << 20)
    checks = kernel_checks(kernels, arena, seed=3)
    assert set(kernels.loaded) == set(kernels.manifests.names())
    assert [c.name for c in checks if not c.ok] == []
    names = {c.name for c in checks}
    assert {"geglu_f32", "scale_f32", "rmsnorm_f32 per head (hd 256)", "rope_neox_d256",
            "rope_norm_d128 (head_dim 96, n_rot 96)", "attn_prefill_d256 window 40",
            "attn_decode_d96 + attn_combine_d96 window 40"} <= names
