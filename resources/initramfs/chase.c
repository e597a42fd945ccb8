/*
 * chase: the pointer chase of the `tlb` test guest as a static Linux program
 * (the `workload` initramfs, resources/initramfs/build.sh).
 *
 *   chase WORKING_SET ACCESSES [SEED]        e.g. chase 64M 4000000
 *
 * One slot per 4K page of an anonymous WORKING_SET mapping, at a pseudo-random
 * cache line of its page; Sattolo's algorithm (xorshift64, j = mulhi(x, i)) links
 * the slots into one random cycle through all pages. Untimed warm-up of
 * min(pages, ACCESSES) steps, then ACCESSES timed dependent loads. Prints one line:
 *   RESULT ns_per_access=F accesses=N ws=B pages=P checksum=0x.. seconds=F setup_seconds=F
 * where checksum is the offset of the final slot (equal to the test guest's).
 */
#include "bench_common.h"

int main(int argc, char **argv)
{
	uint64_t ws, accesses, seed;
	parse_args(argc, argv, &ws, &accesses, &seed);
	double t0 = now_s();
	uint64_t pages = ws / PAGE;
	char *base = table_alloc(ws, "chase");
	uint32_t *next = malloc(pages * sizeof *next);
	if (!next) {
		printf("chase: malloc failed\n");
		return 1;
	}
	for (uint64_t p = 0; p < pages; p++)
		next[p] = (uint32_t)p;
	uint64_t x = seed;
	for (uint64_t i = pages - 1; i > 0; i--) {
		x = xorshift64(x);
		uint64_t j = mulhi(x, i);
		uint32_t t = next[i];
		next[i] = next[j];
		next[j] = t;
	}
	for (uint64_t p = 0; p < pages; p++)
		*(void **)(base + slot_offset(p)) = base + slot_offset(next[p]);
	free(next);
	void **cur = (void **)base;
	uint64_t warm = pages < accesses ? pages : accesses;
	for (uint64_t i = 0; i < warm; i++)
		cur = *cur;
	cur = (void **)base; /* the timed loop starts at slot 0, as in the test guest */
	double t1 = now_s();
	for (uint64_t i = 0; i < accesses; i++)
		cur = *(void **)cur;
	double t2 = now_s();
	printf("RESULT ns_per_access=%.3f accesses=%llu ws=%llu pages=%llu checksum=%#llx "
	       "seconds=%.6f setup_seconds=%.6f\n",
	       (t2 - t1) * 1e9 / (double)accesses, (unsigned long long)accesses,
	       (unsigned long long)ws, (unsigned long long)pages,
	       (unsigned long long)((char *)cur - base), t2 - t1, t1 - t0);
	return 0;
}
