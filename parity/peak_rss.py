"""Run a module as `python -m MODULE ARGS...` and write its peak resident memory to a file.

    python -m ms_rm_parity.peak_rss REPORT_FILE MODULE [ARGS...]

The peak is this process's VmHWM from /proc/self/status, read after the module returns. It is not
the parent's `wait4` ru_maxrss: Linux carries the parent's resident size at fork over into the
child's ru_maxrss (and RUSAGE_SELF), so a child started from a large pytest process would report
the parent's memory, not its own. VmHWM belongs to the memory map that exec created.
"""

import re
import runpy
import sys


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def main() -> None:
    report, module, *args = sys.argv[1:]
    sys.argv = [module, *args]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    with open(report, "w") as f:
        f.write(str(peak_rss_bytes()))
    sys.exit(code)


if __name__ == "__main__":
    main()
