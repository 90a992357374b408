"""glibc keeps freed CPU memory for reuse in the commands that train (clinical_moe.allocator)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from clinical_moe.allocator import ENV_VARIABLE

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A child process (the setting is process-wide) runs twelve "steps" that each make and free
# 32 and 64 MiB tensors, then prints whether the setting took and the page faults of the last
# four steps (the first ones settle the heap: aligned blocks do not always fit freed holes, and
# now and then one block still lands on fresh pages).
CHILD = """
import resource, torch
from clinical_moe.allocator import retain_freed_memory_by_default
on = retain_freed_memory_by_default()
n = 8 * 2**20  # 32 MiB of float32
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(n); b = torch.ones(2 * n); c = a + 1; d = b * 2
    del a, b, c, d
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(on, sum(faults[-4:]))
"""


def _child(env_value: str | None, monkeypatch) -> tuple[bool, int]:
    if env_value is None:
        monkeypatch.delenv(ENV_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(ENV_VARIABLE, env_value)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    res = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    on, faults = res.stdout.split()
    return on == "True", int(faults)


@pytest.mark.skipif(not GLIBC, reason="the setting exists only with glibc's malloc")
def test_freed_tensors_are_reused_without_page_faults(monkeypatch):
    on, faults = _child(None, monkeypatch)
    off, faults_default = _child("0", monkeypatch)
    assert on and not off
    pages = 4 * 192 * 2**20 // 4096  # refaulting every tensor of 4 steps, in 4 KiB pages
    assert faults_default > pages // 2, faults_default  # glibc's default refaults them
    assert faults < faults_default / 4, (faults, faults_default)  # kept: mostly reused


def test_the_training_commands_set_it_and_the_others_do_not(monkeypatch, tmp_path):
    import pipelines.cli as cli

    calls: list[str] = []
    monkeypatch.setattr(cli, "retain_freed_memory_by_default", lambda: calls.append("on"))
    missing = str(tmp_path / "missing.yaml")
    assert cli.main(["train", "--config", missing]) == 2  # a user error after the setting
    assert calls == ["on"]
    calls.clear()
    cli.main(["configs", "list"])
    assert calls == []
    assert set(cli.MODEL_COMMANDS) == {"pretrain", "train", "evaluate", "attribute"}
