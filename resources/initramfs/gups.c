/*
 * gups: random read-modify-write updates (GUPS-style), the `gups` mode of the
 * `tlb` test guest as a static Linux program (the `workload` initramfs).
 *
 *   gups WORKING_SET ACCESSES [SEED]         e.g. gups 64M 4000000
 *
 * Touches every page of an anonymous WORKING_SET mapping (warm-up), runs
 * min(pages, ACCESSES) untimed and ACCESSES timed updates
 * table[mulhi(x, WORKING_SET / 8)] ^= x (x = the next xorshift64 value). Prints:
 *   RESULT ns_per_access=F accesses=N ws=B pages=P checksum=0x.. seconds=F setup_seconds=F
 * where checksum is the XOR of every qword of the table (= XOR of every x used).
 */
#include "bench_common.h"

int main(int argc, char **argv)
{
	uint64_t ws, accesses, seed;
	parse_args(argc, argv, &ws, &accesses, &seed);
	double t0 = now_s();
	uint64_t pages = ws / PAGE, words = ws / 8;
	volatile uint64_t *t = table_alloc(ws, "gups");
	for (uint64_t p = 0; p < pages; p++)
		t[p * (PAGE / 8)] = 0;
	uint64_t x = seed;
	uint64_t warm = pages < accesses ? pages : accesses;
	for (uint64_t i = 0; i < warm; i++) {
		x = xorshift64(x);
		t[mulhi(x, words)] ^= x;
	}
	double t1 = now_s();
	for (uint64_t i = 0; i < accesses; i++) {
		x = xorshift64(x);
		t[mulhi(x, words)] ^= x;
	}
	double t2 = now_s();
	uint64_t sum = 0;
	for (uint64_t i = 0; i < words; i++)
		sum ^= t[i];
	printf("RESULT ns_per_access=%.3f accesses=%llu ws=%llu pages=%llu checksum=%#llx "
	       "seconds=%.6f setup_seconds=%.6f\n",
	       (t2 - t1) * 1e9 / (double)accesses, (unsigned long long)accesses,
	       (unsigned long long)ws, (unsigned long long)pages, (unsigned long long)sum,
	       t2 - t1, t1 - t0);
	return 0;
}
