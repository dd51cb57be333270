"""Runs last in a whole-suite run (file order): the process must stay well inside the Linux per-process limit that
XLA:CPU's compiled programs consume, or a later compile crashes the whole run
(see `conftest._release_compiled_programs`)."""

import os
import pathlib

import pytest


def _max_map_count() -> int | None:
    p = pathlib.Path("/proc/sys/vm/max_map_count")
    return int(p.read_text()) if p.exists() else None


def test_memory_mappings_stay_well_under_the_limit():
    limit = _max_map_count()
    if limit is None or not pathlib.Path(f"/proc/{os.getpid()}/maps").exists():
        pytest.skip("no /proc memory-map accounting on this system")
    with open(f"/proc/{os.getpid()}/maps") as f:
        mappings = sum(1 for _ in f)
    assert mappings < limit // 4, (
        f"{mappings} memory mappings in this test process (limit vm.max_map_count={limit}): compiled programs are "
        "piling up across test modules; a longer run would crash in XLA's next compile")
