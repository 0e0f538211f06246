"""Process-level helpers: stale extension-build locks are removed, live ones are kept."""
import os
import subprocess
import time

from pretrain.runtime import clear_stale_build_locks


def test_a_stale_build_lock_is_removed_and_a_live_one_kept(tmp_path):
    stale = tmp_path / "deepspeed_shm_comm"
    live = tmp_path / "memtrain_kernels"
    fresh = tmp_path / "other_op"
    for d in (stale, live, fresh):
        d.mkdir()
        (d / "lock").write_text("")
    old = time.time() - 3600
    os.utime(stale / "lock", (old, old))
    os.utime(live / "lock", (old, old))
    builder = subprocess.Popen(["sleep", "30"], cwd=live)        # a build still working in its directory
    try:
        time.sleep(0.2)
        removed = clear_stale_build_locks(str(tmp_path), min_age_s=60)
    finally:
        builder.kill()
        builder.wait()
    assert removed == [str(stale / "lock")]
    assert not (stale / "lock").exists()
    assert (live / "lock").exists(), "a build in progress keeps its lock"
    assert (fresh / "lock").exists(), "a lock younger than min_age_s is kept (a build may have just started)"
    assert clear_stale_build_locks(str(tmp_path / "missing")) == []
