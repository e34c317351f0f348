"""The watchman of keyplane's stdio MCP server processes: ``python -m keyplane.gateway.stdio_reaper``.

keyplane starts one per process, with a pipe on its stdin, and tells it ``+PGID`` for every process group it
starts and ``-PGID`` for every group it has stopped itself. When the pipe reaches end-of-file, keyplane is
gone (stopped, crashed or SIGKILLed: the kernel closes the pipe in every case), and the watchman kills every
group still listed, grandchildren included (``npx`` and ``uvx`` start the real server as a child), then exits.
No zombie: the groups' processes were keyplane's children and are reparented to init, which reaps them.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for keyplane is keyplane's to handle
    groups: set[int] = set()
    for line in sys.stdin.buffer:
        text = line.strip()
        if text[:1] == b"+":
            groups.add(int(text[1:]))
        elif text[:1] == b"-":
            groups.discard(int(text[1:]))
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


if __name__ == "__main__":
    main()
