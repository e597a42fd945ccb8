/*
 * memwork: real user-space memory work for the vmm balloon test (the `memwork`
 * initramfs, resources/initramfs/build.sh). Static, no library beyond libc.
 *
 *   memwork [MIB] [MAX_SECONDS]
 *
 * Round after round it maps MIB MiB of anonymous memory, writes a pattern into
 * every 8-byte word, reads every word back, and unmaps it, while it watches the
 * guest's MemTotal (/proc/meminfo): a virtio-balloon inflate lowers it, a deflate
 * raises it again. It prints, on stdout (the console):
 *   MEMWORK-START total_kib=N
 *   MEMWORK round R total_kib=N            (every round)
 *   MEMWORK-LOW total_kib=N                (once: MemTotal fell 24 MiB below its start)
 *   MEMWORK-HIGH total_kib=N               (once, after LOW: 24 MiB above the lowest seen)
 *   MEMWORK-OK rounds=R checked_mib=M min_total_kib=A final_total_kib=B
 * after HIGH and 3 more rounds (the balloon was inflated while it worked, then
 * deflated); exit status 0. A host that drives the balloon waits for LOW before it
 * deflates, so a short inflate between two rounds is not missed. A wrong word prints MEMWORK-FAIL with the address and exits 1;
 * MAX_SECONDS (default 600) without a deflate prints MEMWORK-FAIL and exits 2.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static long mem_total_kib(void)
{
	char line[256];
	long v = -1;
	FILE *f = fopen("/proc/meminfo", "r");
	if (!f)
		return -1;
	while (fgets(line, sizeof line, f))
		if (sscanf(line, "MemTotal: %ld kB", &v) == 1)
			break;
	fclose(f);
	return v;
}

int main(int argc, char **argv)
{
	long mib = argc > 1 ? atol(argv[1]) : 48;
	long max_s = argc > 2 ? atol(argv[2]) : 600;
	size_t len = (size_t)mib << 20, words = len / 8;
	long total = mem_total_kib(), start_total = total, min_total = total;
	long after = -1, rounds = 0, low = 0;
	time_t start = time(NULL);

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (total < 0 || mib <= 0) {
		printf("MEMWORK-FAIL cannot read MemTotal or bad size\n");
		return 2;
	}
	printf("MEMWORK-START total_kib=%ld\n", total);
	for (;;) {
		uint64_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
				   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED) {
			printf("MEMWORK-FAIL mmap of %ld MiB failed\n", mib);
			return 1;
		}
		uint64_t salt = 0x9e3779b97f4a7c15ull * (uint64_t)(rounds + 1);
		for (size_t i = 0; i < words; i++)
			p[i] = (uint64_t)i ^ salt;
		for (size_t i = 0; i < words; i++)
			if (p[i] != ((uint64_t)i ^ salt)) {
				printf("MEMWORK-FAIL round %ld word %zu: %#llx != %#llx\n",
				       rounds, i, (unsigned long long)p[i],
				       (unsigned long long)((uint64_t)i ^ salt));
				return 1;
			}
		munmap(p, len);
		rounds++;
		total = mem_total_kib();
		if (total < min_total)
			min_total = total;
		printf("MEMWORK round %ld total_kib=%ld\n", rounds, total);
		if (!low && total <= start_total - 24 * 1024) {
			low = 1;
			printf("MEMWORK-LOW total_kib=%ld\n", total);
		}
		if (low && after < 0 && total >= min_total + 24 * 1024) {
			after = rounds;
			printf("MEMWORK-HIGH total_kib=%ld\n", total);
		}
		if (after >= 0 && rounds >= after + 3) {
			printf("MEMWORK-OK rounds=%ld checked_mib=%ld min_total_kib=%ld final_total_kib=%ld\n",
			       rounds, rounds * mib, min_total, total);
			return 0;
		}
		if (time(NULL) - start > max_s) {
			printf("MEMWORK-FAIL no deflate within %ld s (min_total_kib=%ld total_kib=%ld)\n",
			       max_s, min_total, total);
			return 2;
		}
	}
}
