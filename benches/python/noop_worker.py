# SPDX-License-Identifier: MIT
"""The benchmark's worker for fm's worker mode: acks every message and does nothing else.

fm writes one record-format JSON line per message on stdin and waits for one answer line on
stdout (fm-callbacks(7)). This reads the line and answers, without even parsing it, so what
the benchmark measures is fm's side of the protocol plus the pipe round trip.
"""

import sys


def main():
    answer = '{"result": "ack"}\n'
    out = sys.stdout
    for _line in sys.stdin:
        out.write(answer)
        out.flush()


if __name__ == "__main__":
    main()
