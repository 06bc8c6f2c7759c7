"""The split-K decode attention's split policy: about 64 keys a split (one key tile), at most
MAX_DECODE_SPLITS splits, every chunk a multiple of 64 covering the cache."""

import pytest

from ukgpu.gpu.cuda.attention_ops import MAX_DECODE_SPLITS, decode_splits


@pytest.mark.parametrize("n_ctx", [1, 63, 64, 65, 136, 648, 2048, 2049, 4096, 32768, 131072])
def test_splits_cover_the_cache_in_64_key_chunks(n_ctx, monkeypatch):
    monkeypatch.delenv("UKGPU_DECODE_SPLIT_KEYS", raising=False)
    s, chunk = decode_splits(n_ctx)
    assert 1 <= s <= MAX_DECODE_SPLITS and chunk % 64 == 0 and s * chunk >= n_ctx
    assert (s - 1) * chunk < n_ctx  # no split starts past the cache
    if n_ctx <= 64 * MAX_DECODE_SPLITS:
        assert chunk == 64  # one tile of keys a program up to 2048 rows


def test_the_server_default_context_gets_every_split(monkeypatch):
    monkeypatch.delenv("UKGPU_DECODE_SPLIT_KEYS", raising=False)
    assert decode_splits(2048) == (32, 64)
    assert decode_splits(136) == (3, 64)


def test_keys_per_split_can_be_set_but_not_below_one_tile(monkeypatch):
    monkeypatch.setenv("UKGPU_DECODE_SPLIT_KEYS", "256")
    assert decode_splits(2048) == (8, 256)
    monkeypatch.setenv("UKGPU_DECODE_SPLIT_KEYS", "16")
    assert decode_splits(2048) == (32, 64)
