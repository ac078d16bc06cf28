// Call and epoch numbers inside protocol words: 32-bit serial numbers.
//
// The call counters (the intranode epoch, the low-latency dispatch and
// combine counters) are 64-bit and never wrap. A protocol word, though,
// carries a counter and a value in 64 bits: (serial << 32) | value, the
// serial being the counter's low 32 bits, which do wrap (after 2^32 calls).
// So words are never compared as 64-bit integers across calls (after the wrap
// a new word would compare below a stale one). Instead:
//
//  * "is this word of call n" is serial equality (word_in_call). A word a
//    reader checks is of the call it waits for or older: the halves
//    alternate, and a peer writes call n + 2 into a slot only after this rank
//    finished call n (see intranode.cuh and low_latency.cuh). Equality of a
//    stale word's serial with n's would need the slot untouched for a
//    multiple of 2^32 calls, where a serial-order test (RFC 1982) already
//    fails for a slot untouched for 2^31 calls (slots may go unused for
//    long: a shape that needs fewer ring chunks or experts).
//  * values are ordered only between words of the same call (word_reached).
//  * a serial is turned back into the real call number for messages by
//    serial arithmetic (call_near, RFC 1982): the call within 2^31 of a
//    reference call, here the waiting rank's own call; the peer it names is
//    at most a few calls away.
//
// Fresh protocol words are serial_word(start, 0), `start` being the value the
// counters start from (0: cudaMemset; the test hook JAX_EP_TEST_COUNTER_START
// starts them just below 2^32 to run calls through the wrap), so they read as
// the call before the first one.
#pragma once

#ifdef __CUDACC__
#define JAX_EP_HOST_DEVICE __host__ __device__
#else
#define JAX_EP_HOST_DEVICE
#endif

namespace jax_ep {

// The serial of a 64-bit call counter: its low 32 bits.
JAX_EP_HOST_DEVICE inline unsigned int serial_of(unsigned long long call) {
  return static_cast<unsigned int>(call & 0xffffffffull);
}

// (serial of `call`) << 32 | value.
JAX_EP_HOST_DEVICE inline unsigned long long serial_word(unsigned long long call, unsigned int value) {
  return static_cast<unsigned long long>(serial_of(call)) << 32 | value;
}

JAX_EP_HOST_DEVICE inline unsigned int word_serial(unsigned long long word) {
  return static_cast<unsigned int>(word >> 32);
}

JAX_EP_HOST_DEVICE inline unsigned int word_value(unsigned long long word) {
  return static_cast<unsigned int>(word & 0xffffffffull);
}

// The word was written in call `call`.
JAX_EP_HOST_DEVICE inline bool word_in_call(unsigned long long word, unsigned long long call) {
  return word_serial(word) == serial_of(call);
}

// The word is of call `call` with a value of at least `value`.
JAX_EP_HOST_DEVICE inline bool word_reached(unsigned long long word, unsigned long long call, unsigned int value) {
  return word_in_call(word, call) && word_value(word) >= value;
}

// The word's value in call `call`, 0 for a word of another call (for minima
// over words some of which may still be stale).
JAX_EP_HOST_DEVICE inline unsigned int value_in_call(unsigned long long word, unsigned long long call) {
  return word_in_call(word, call) ? word_value(word) : 0u;
}

// RFC 1982 order: serial a is b or after it (a - b mod 2^32 below 2^31).
JAX_EP_HOST_DEVICE inline bool serial_at_or_after(unsigned int a, unsigned int b) {
  return a - b < 0x80000000u;
}

// The call number whose serial is `serial`, nearest to `near` (within 2^31 of
// it, before or after): a word's serial as a real call number.
JAX_EP_HOST_DEVICE inline unsigned long long call_near(unsigned int serial, unsigned long long near) {
  const unsigned int ahead = serial - serial_of(near);  // mod 2^32
  return serial_at_or_after(serial, serial_of(near)) ? near + ahead : near - (0u - ahead);
}

}  // namespace jax_ep
