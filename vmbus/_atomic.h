/* Memory-ordering primitives for the ring's shared control page.
 * Thin wrappers over GCC/Clang __atomic builtins so the .pyx can name the
 * ordering it needs; each call site says what the barrier orders. */
#ifndef VMBUS_ATOMIC_H
#define VMBUS_ATOMIC_H
#include <stdint.h>

static inline uint32_t vmbus_load_acquire(const uint32_t *p)
{ return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

static inline uint32_t vmbus_load_relaxed(const uint32_t *p)
{ return __atomic_load_n(p, __ATOMIC_RELAXED); }

static inline void vmbus_store_release(uint32_t *p, uint32_t v)
{ __atomic_store_n(p, v, __ATOMIC_RELEASE); }

static inline void vmbus_store_relaxed(uint32_t *p, uint32_t v)
{ __atomic_store_n(p, v, __ATOMIC_RELAXED); }

static inline void vmbus_fence_full(void)
{ __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* One turn of a spin on a ring the peer writes: tells the CPU (and a
 * hypervisor watching for pause loops) that this is a wait. */
static inline void vmbus_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

#endif
