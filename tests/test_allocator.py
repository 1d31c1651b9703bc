"""`allocator.keep_freed_memory`: glibc serves a large request from its heap and keeps it when
freed, where by default it maps fresh pages and unmaps them; the trainer sets it on the CPU."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import pytest

from entroprl.train import allocator
from entroprl.train.trainer import Trainer
from tests.policies import make_tiny_policy
from tests.test_trainer import small_config


def glibc_with_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


PROBE = textwrap.dedent(
    """
    import ctypes, sys
    from entroprl.train import allocator

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    applied = sys.argv[1] == "keep" and allocator.keep_freed_memory()
    size = 16 << 20
    mapped = libc.mallinfo2().hblkhd
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    mapped_for_it = libc.mallinfo2().hblkhd - mapped
    libc.free(block)
    print(applied, mapped_for_it >= size, libc.mallinfo2().fordblks >= size)
    """
)


@pytest.mark.skipif(not glibc_with_mallinfo2(), reason="glibc 2.33+ (mallinfo2) only")
def test_a_freed_block_stays_in_the_heap():
    def probe(mode: str) -> str:
        run = subprocess.run(
            [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
        )
        return run.stdout.strip()

    # applied, the 16 MiB block mapped by mmap, the freed block kept in the heap
    assert probe("default") == "False True False"
    assert probe("keep") == "True False True"


def test_nothing_to_set_off_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False


def test_the_trainer_sets_it_on_the_cpu(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    model, tok = make_tiny_policy()
    Trainer(small_config(tmp_path / "run"), model=model, tokenizer=tok)
    assert calls == [1]
