/*
 * nsclock: prints CLOCK_MONOTONIC in nanoseconds (the `workload` init times CMD
 * with it; busybox `date` has no %N). Part of the guest init protocol
 * (docs/ARCHITECTURE.md, "Guest init protocol").
 */
#include <stdio.h>
#include <time.h>

int main(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	printf("%llu\n", (unsigned long long)t.tv_sec * 1000000000ull + (unsigned long long)t.tv_nsec);
	return 0;
}
