/*
 * Shared helpers of the `chase` and `gups` workloads (resources/initramfs/build.sh,
 * `workload` variant): the same xorshift64 / mulhi / slot layout as the `tlb` test
 * guest (vmm/src/testguest/guests/tlb.rs), so guest-Linux and bare test-guest
 * figures compare, and a size parser (bytes, or K/M/G suffix).
 */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096ull
#define GOLDEN 0x9E3779B97F4A7C15ull
#define DEFAULT_SEED 0x2545F4914F6CDD1Dull

static inline uint64_t xorshift64(uint64_t x)
{
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return x;
}

static inline uint64_t mulhi(uint64_t x, uint64_t n)
{
	return (uint64_t)(((unsigned __int128)x * n) >> 64);
}

static inline uint64_t slot_offset(uint64_t p)
{
	return (p << 12) + (((p * GOLDEN) >> 58) << 6);
}

static inline double now_s(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* "64M", "1G", "65536K", "4096": bytes; 0 on a bad value. */
static uint64_t parse_size(const char *s)
{
	char *end;
	uint64_t v = strtoull(s, &end, 0);
	switch (*end) {
	case 'k': case 'K': v <<= 10; end++; break;
	case 'm': case 'M': v <<= 20; end++; break;
	case 'g': case 'G': v <<= 30; end++; break;
	}
	return *end ? 0 : v;
}

static void *table_alloc(uint64_t ws, const char *prog)
{
	void *p = mmap(NULL, ws, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		printf("%s: mmap of %llu bytes failed\n", prog, (unsigned long long)ws);
		exit(1);
	}
	return p;
}

/* Parses `PROG WS ACCESSES [SEED]`; exits 2 on bad usage. */
static void parse_args(int argc, char **argv, uint64_t *ws, uint64_t *accesses, uint64_t *seed)
{
	if (argc < 3 || argc > 4) {
		fprintf(stderr, "usage: %s WORKING_SET[K|M|G] ACCESSES [SEED]\n", argv[0]);
		exit(2);
	}
	*ws = parse_size(argv[1]);
	*accesses = strtoull(argv[2], NULL, 0);
	*seed = argc > 3 ? strtoull(argv[3], NULL, 0) : DEFAULT_SEED;
	if (*ws < PAGE || *ws % PAGE || *accesses == 0 || *seed == 0) {
		fprintf(stderr, "%s: the working set must be a non-zero multiple of 4K, "
			"accesses and seed non-zero\n", argv[0]);
		exit(2);
	}
}
#endif
