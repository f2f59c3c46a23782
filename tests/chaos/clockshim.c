/* A server's wall clock, offset at run time, for the chaos suite's clock_step fault.
 *
 * Preloaded (LD_PRELOAD) into a server that libfaketime cannot start (redis-server:
 * its jemalloc calls clock_gettime while libfaketime 0.9.10 initializes, and the two
 * recurse). CLOCK_REALTIME(_COARSE), gettimeofday and time read the kernel's clock
 * plus the int64 nanoseconds mapped from $CHAOS_CLOCK_FILE, which the harness
 * rewrites; every other clock is the kernel's. The kernel is asked by syscall, so
 * nothing here can call back into the allocator.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static const volatile int64_t *offset_ns;
static volatile int tried;

static void map_offset(void) {
    const char *path = getenv("CHAOS_CLOCK_FILE");
    if (path != NULL) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            void *p = mmap(NULL, sizeof(int64_t), PROT_READ, MAP_SHARED, fd, 0);
            close(fd);
            if (p != MAP_FAILED) offset_ns = p;
        }
    }
    tried = 1;
}

__attribute__((constructor)) static void init(void) { map_offset(); }

static void shift(struct timespec *ts) {
    if (!tried) map_offset();
    int64_t off = offset_ns != NULL ? __atomic_load_n(offset_ns, __ATOMIC_RELAXED) : 0;
    int64_t ns = (int64_t)ts->tv_nsec + off % 1000000000;
    ts->tv_sec += off / 1000000000 + (ns >= 1000000000) - (ns < 0);
    ts->tv_nsec = (ns % 1000000000 + 1000000000) % 1000000000;
}

int clock_gettime(clockid_t clock, struct timespec *ts) {
    long r = syscall(SYS_clock_gettime, clock, ts);
    if (r == 0 && (clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE)) shift(ts);
    return (int)r;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
    struct timespec ts;
    (void)tz;
    if (syscall(SYS_clock_gettime, CLOCK_REALTIME, &ts) != 0) return -1;
    shift(&ts);
    tv->tv_sec = ts.tv_sec;
    tv->tv_usec = ts.tv_nsec / 1000;
    return 0;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out != NULL) *out = ts.tv_sec;
    return ts.tv_sec;
}
