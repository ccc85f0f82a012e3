"""Disk files record their prefix tree and creating session: a restart adopts each file once, into its tree
and session; files written before trees existed load into their namespace's tree (real files)."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from cache import disk
from tests.unit.cache.disk_helpers import disk_files, make_cache, make_state

PROMPT = list(range(50, 90))


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def _to_old_format(path: Path) -> None:
    """Rewrite a file as the cache wrote it before trees: no `tree` field, checksum without it."""
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    del meta["tree"]
    meta["checksum"] = disk.checksum(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


def test_a_shared_checkpoint_is_written_and_adopted_once_into_its_tree(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    assert cache.capture("key-a", "alice", PROMPT, make_state(1), reason="boundary", tree="common")
    lease = cache.lookup("key-b", "bob", [*PROMPT, 1], tree="common")
    assert lease is not None and lease.scope == "shared"
    cache.release(lease)
    assert not cache.capture("key-b", "bob", PROMPT, make_state(1), reason="boundary", tree="common")
    cache.close()
    (path,) = disk_files(tmp_path)
    assert _meta(path)["tree"] == "common" and _meta(path)["namespace"] == "key-a"
    fresh = make_cache(tmp_path)
    assert fresh.stats().tiers["disk"].checkpoints == 1 and fresh.stats().trees == 1
    info = fresh.session_info("key-a", "alice")  # adopted into its creating session
    assert info is not None and [c["position"] for c in info["checkpoints"]] == [40]
    assert fresh.lookup("key-a", "alice", PROMPT) is None  # not in key-a's own tree
    lease = fresh.lookup("key-b", "bob", [*PROMPT, 1], tree="common")
    assert lease is not None and (lease.position, lease.tier, lease.scope) == (40, "disk", "shared")
    fresh.release(lease)


def test_old_format_files_load_into_their_namespaces_tree(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    cache.capture("ns", "a", PROMPT, make_state(1), reason="x", tree="was-a")
    cache.capture("ns", "b", PROMPT, make_state(1), reason="x", tree="was-b")  # the same tokens again
    cache.capture("ns", "b", [7, 8], make_state(2), reason="x", tree="was-b")
    cache.close()
    files = disk_files(tmp_path)
    assert len(files) == 3
    for path in files:
        _to_old_format(path)  # as if written per session, before trees: two copies of PROMPT in "ns"
    fresh = make_cache(tmp_path)
    assert fresh.stats().disk_corrupt == 0 and fresh.stats().tiers["disk"].checkpoints == 2
    fresh.flush()
    assert len(disk_files(tmp_path)) == 2  # the duplicate's file is removed
    lease = fresh.lookup("ns", "c", [*PROMPT, 1])
    assert lease is not None and (lease.position, lease.scope) == (40, "shared")
    fresh.fetch(lease)
    fresh.release(lease)
    for sess in ("a", "b"):  # both old copies' sessions reference the one kept
        info = fresh.session_info("ns", sess)
        assert info is not None and 40 in [c["position"] for c in info["checkpoints"]]
    assert fresh.lookup("ns", "a", [*PROMPT, 1], tree="was-a") is None
