"""cuda/serial.cuh on the CPU: the call serials in protocol words, across the 2^32 wrap.

Compiles a small host program against the header (g++, no CUDA needed) and
checks every case it prints."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

PROGRAM = r"""
#include <cstdio>
#include "serial.cuh"
using namespace jax_ep;
#define CHECK(name, cond) std::printf("%s %d\n", name, (cond) ? 1 : 0)

int main() {
  const unsigned long long wrap = 1ull << 32;
  // The call at the wrap and the two before it: serials 0xfffffffe, 0xffffffff, 0.
  const unsigned long long a = wrap - 2, b = wrap - 1, c = wrap;
  CHECK("serial_of_wrap", serial_of(c) == 0 && serial_of(b) == 0xffffffffu);
  CHECK("word_roundtrip", word_serial(serial_word(b, 7)) == 0xffffffffu && word_value(serial_word(b, 7)) == 7);
  // A slot holding call a's word (two calls ago, the same half) is not ready for call c...
  CHECK("stale_not_ready", !word_in_call(serial_word(a, 5), c) && !word_reached(serial_word(a, 5), c, 0));
  // ... where the old 64-bit comparison of packed words thought it was far ahead:
  CHECK("packed_compare_was_wrong", (serial_word(a, 5) >= (c << 32)) && serial_word(c, 0) < serial_word(a, 5));
  CHECK("ready_after_wrap", word_in_call(serial_word(c, 3), c) && word_reached(serial_word(c, 3), c, 3));
  CHECK("value_below", !word_reached(serial_word(c, 2), c, 3));
  CHECK("value_in_call", value_in_call(serial_word(c, 9), c) == 9 && value_in_call(serial_word(b, 9), c) == 0);
  // RFC 1982 order across the wrap.
  CHECK("order_across_wrap", serial_at_or_after(serial_of(c), serial_of(b)) &&
                             !serial_at_or_after(serial_of(b), serial_of(c)));
  CHECK("order_equal", serial_at_or_after(5u, 5u));
  CHECK("order_half_range", serial_at_or_after(0x7fffffffu, 0u) && !serial_at_or_after(0x80000000u, 0u));
  // Real call numbers back from serials, near the waiting rank's call.
  CHECK("call_near_behind", call_near(serial_of(b), c) == b);
  CHECK("call_near_ahead", call_near(serial_of(c + 1), c) == c + 1);
  CHECK("call_near_same", call_near(serial_of(c), c) == c);
  CHECK("call_near_far", call_near(serial_of(3 * wrap + 17), 3 * wrap + 20) == 3 * wrap + 17);
  // The printed call of a wait message is the call, not the packed word.
  CHECK("message_call", call_near(word_serial(serial_word(4, 1)), 4) == 4);
  return 0;
}
"""


def _compiler():
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_compiler() is None, reason="no C++ compiler")
def test_serial_header_across_the_wrap(tmp_path):
    src = tmp_path / "serial_test.cc"
    src.write_text(PROGRAM)
    exe = tmp_path / "serial_test"
    subprocess.run(
        [_compiler(), "-std=c++17", "-O1", "-Wall", "-Werror", "-I", str(ROOT / "cuda"), str(src), "-o", str(exe)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=30).stdout
    results = dict(line.split() for line in out.splitlines())
    assert len(results) == 15
    failed = [name for name, ok in results.items() if ok != "1"]
    assert not failed, failed
