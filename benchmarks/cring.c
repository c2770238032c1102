/* A minimal single-producer/single-consumer shared-memory ring in C: the
 * practical limit the Python methods are compared against.
 *
 *   cring MESSAGES SIZE RING_BYTES [BATCH]
 *
 * Maps one anonymous shared region, forks a producer and a consumer that
 * busy-poll, and moves MESSAGES messages of SIZE bytes. Each message is an
 * 8-byte length followed by the payload, padded to 8 bytes, and may wrap
 * around the end of the data area (copied in two pieces, as the VMBus ring
 * does). The producer publishes `head` (release) after every BATCH messages
 * (default 1) and before it waits for space; the consumer hands space back
 * by publishing `tail` after every message (release). Each side re-reads
 * the other's index (acquire) only when its cached copy says full/empty,
 * and yields the CPU after every SPINS polls in a row: free unless another
 * task wants this CPU, and it keeps a shared machine from time-slicing both
 * spinners on one core. The consumer copies every payload into its own
 * page-aligned buffer and checks the sequence number the producer stamped
 * into it.
 *
 * Timing, as in benchmarks/ipc.py: the consumer starts the clock just before
 * it releases the producer and stops it after copying the last message.
 * Output, one line: messages/s, payload MB/s (10^6 bytes), seconds. */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct control {
    _Alignas(64) _Atomic uint64_t head; /* bytes published by the producer */
    _Alignas(64) _Atomic uint64_t tail; /* bytes released by the consumer */
    _Alignas(64) _Atomic int go;        /* the consumer's start signal */
    _Alignas(64) double seconds;        /* the consumer's result */
    uint64_t errors;
};

#define SPINS 4096

static struct control *ctl;
static unsigned char *data;
static uint64_t cap; /* data area size, a power of two */

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void put(uint64_t pos, const void *src, uint64_t n)
{
    uint64_t at = pos & (cap - 1), first = cap - at < n ? cap - at : n;
    memcpy(data + at, src, first);
    memcpy(data, (const unsigned char *)src + first, n - first);
}

static void get(uint64_t pos, void *dst, uint64_t n)
{
    uint64_t at = pos & (cap - 1), first = cap - at < n ? cap - at : n;
    memcpy(dst, data + at, first);
    memcpy((unsigned char *)dst + first, data, n - first);
}

static void *page_buffer(uint64_t size)
{
    unsigned char *p = aligned_alloc(4096, (size + 4095) & ~4095ULL);
    if (!p) {
        perror("aligned_alloc");
        exit(2);
    }
    memset(p, 0, size);
    return p;
}

static void produce(uint64_t count, uint64_t size, uint64_t batch)
{
    unsigned char *msg = page_buffer(size);
    uint64_t len = size, step = 8 + ((size + 7) & ~7ULL);
    uint64_t head = 0, tail = 0, unpublished = 0;
    while (!atomic_load_explicit(&ctl->go, memory_order_acquire))
        sched_yield();
    for (uint64_t i = 0; i < count; i++) {
        if (head + step > tail + cap) {
            atomic_store_explicit(&ctl->head, head, memory_order_release);
            for (unsigned spins = 1; head + step > tail + cap; spins++) {
                if (spins % SPINS == 0)
                    sched_yield();
                tail = atomic_load_explicit(&ctl->tail, memory_order_acquire);
            }
        }
        if (size >= 8)
            memcpy(msg, &i, 8);
        put(head, &len, 8);
        put(head + 8, msg, size);
        head += step;
        if (++unpublished == batch || i + 1 == count) {
            atomic_store_explicit(&ctl->head, head, memory_order_release);
            unpublished = 0;
        }
    }
}

static void consume(uint64_t count, uint64_t size, uint64_t unused)
{
    unsigned char *out = page_buffer(size);
    (void)unused; /* spawn() passes the producer's BATCH here */
    uint64_t head = 0, tail = 0, len, seq, errors = 0;
    double start = now();
    atomic_store_explicit(&ctl->go, 1, memory_order_release);
    for (uint64_t i = 0; i < count; i++) {
        for (unsigned spins = 1; tail == head; spins++) {
            if (spins % SPINS == 0)
                sched_yield();
            head = atomic_load_explicit(&ctl->head, memory_order_acquire);
        }
        get(tail, &len, 8);
        if (len != size) { /* never copy past `out` */
            errors = count;
            break;
        }
        get(tail + 8, out, len);
        if (size >= 8 && (memcpy(&seq, out, 8), seq != i))
            errors++;
        tail += 8 + ((len + 7) & ~7ULL);
        atomic_store_explicit(&ctl->tail, tail, memory_order_release);
    }
    ctl->seconds = now() - start;
    ctl->errors = errors;
}

static pid_t spawn(void (*body)(uint64_t, uint64_t, uint64_t), uint64_t count, uint64_t size,
                   uint64_t offset)
{
    pid_t parent = getpid(), pid = fork();
    if (pid < 0) {
        perror("fork");
        exit(2);
    }
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlive the runner */
        if (getppid() != parent)
            _exit(3);
        body(count, size, offset);
        _exit(0);
    }
    return pid;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s MESSAGES SIZE RING_BYTES [BATCH]\n", argv[0]);
        return 2;
    }
    uint64_t count = strtoull(argv[1], NULL, 0), size = strtoull(argv[2], NULL, 0);
    uint64_t batch = argc > 4 ? strtoull(argv[4], NULL, 0) : 1;
    cap = strtoull(argv[3], NULL, 0);
    if (count == 0 || batch == 0 || cap < 4096 || (cap & (cap - 1)) || size + 16 > cap) {
        fprintf(stderr, "need MESSAGES, BATCH > 0, RING_BYTES a power of two >= 4096 > SIZE + 16\n");
        return 2;
    }
    alarm(120); /* a hard bound; children die with us (PDEATHSIG) */
    void *map = mmap(NULL, 4096 + cap, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) {
        perror("mmap");
        return 2;
    }
    ctl = map;
    data = (unsigned char *)map + 4096;
    memset(map, 0, 4096 + cap); /* fault the pages in before timing */
    pid_t pids[2] = {spawn(consume, count, size, 0), spawn(produce, count, size, batch)};
    int failed = 0;
    for (int i = 0; i < 2; i++) { /* the consumer first: if it gave up, stop the producer */
        int status;
        if (i == 1 && (failed || ctl->errors))
            kill(pids[1], SIGKILL);
        if (waitpid(pids[i], &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
            failed = 1;
    }
    if (failed || ctl->errors) {
        fprintf(stderr, "cring: a child failed or %llu messages were wrong\n",
                (unsigned long long)ctl->errors);
        return 1;
    }
    double rate = (double)count / ctl->seconds;
    printf("%.1f %.1f %.6f\n", rate, rate * (double)size / 1e6, ctl->seconds);
    return 0;
}
