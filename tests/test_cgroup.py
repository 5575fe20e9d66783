"""The memory cgroup that binds this process: v1 and v2, limits, "no limit", ancestors."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoaccum.memory.cgroup import cgroup_memory

CGROUP = Path(__file__).parent / "data" / "cgroup"
GiB = 2**30
MiB = 2**20


def test_cgroup_v2_limit():
    cg = cgroup_memory(CGROUP / "v2_limited", proc_cgroup=None)
    assert cg is not None
    assert (cg.version, cg.limit, cg.usage, cg.remaining) == (2, 8 * GiB, 2 * GiB, 6 * GiB)


def test_cgroup_v2_max_means_no_limit():
    cg = cgroup_memory(CGROUP / "v2_unlimited", proc_cgroup=None)
    assert cg is not None
    assert (cg.version, cg.limit, cg.usage, cg.remaining) == (2, None, 100 * MiB, None)


def test_cgroup_v1_limit_and_a_host_path_the_container_does_not_mount():
    # /proc/self/cgroup names /docker/abc123, which is not under the container's mount
    proc = CGROUP / "v1_docker.proc_self_cgroup"
    cg = cgroup_memory(CGROUP / "v1_limited", proc_cgroup=proc)
    assert cg is not None
    assert (cg.version, cg.limit, cg.usage, cg.remaining) == (1, 4 * GiB, GiB, 3 * GiB)


def test_cgroup_v1_huge_value_means_no_limit():
    cg = cgroup_memory(CGROUP / "v1_unlimited", proc_cgroup=None)
    assert cg is not None
    assert (cg.version, cg.limit, cg.usage) == (1, None, 50 * MiB)


def test_cgroup_tightest_ancestor_binds():
    root = CGROUP / "v2_nested"
    cg = cgroup_memory(root, proc_cgroup=CGROUP / "v2_nested.proc_self_cgroup")
    assert cg is not None
    assert Path(cg.path) == root / "parent"
    assert (cg.limit, cg.remaining) == (2 * GiB, 512 * MiB)


def test_cgroup_absent_or_malformed():
    assert cgroup_memory(CGROUP / "empty", proc_cgroup=None) is None
    with pytest.raises(ValueError, match="lots"):
        cgroup_memory(CGROUP / "malformed", proc_cgroup=None)
