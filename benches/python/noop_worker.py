# SPDX-License-Identifier: MIT
"""The benchmark's worker for fm's worker mode: acks every message and does nothing else.

fm writes one record-format JSON line per message on stdin and waits for one answer line on
stdout (fm-callbacks(7)). This reads the line and answers, without even parsing it, so what
the benchmark measures is fm's side of the protocol plus the pipe round trip.

With an argument, it waits that many seconds before each answer (the latency section: a
callback waiting on a database or a web service).
"""

import sys
import time


def main():
    answer = '{"result": "ack"}\n'
    wait = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
    out = sys.stdout
    for _line in sys.stdin:
        if wait:
            time.sleep(wait)
        out.write(answer)
        out.flush()


if __name__ == "__main__":
    main()
