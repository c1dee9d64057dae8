/* The trivial /init of kiln's boot benchmark: it reports on the console and
 * powers the VM off. Booting it with the same kernel as an agent image shows
 * what the agent itself adds to launch-to-ready. */
#include <sys/reboot.h>
#include <unistd.h>

int main(void)
{
	static const char msg[] = "KILN-USERSPACE-READY\n";
	(void)write(1, msg, sizeof msg - 1);
	sync();
	reboot(RB_POWER_OFF);
	for (;;)
		pause();
}
