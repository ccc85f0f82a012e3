"""bench/step_host_cpu.py's http table: the server's CPU per streamed token beside the rates."""

from __future__ import annotations

from bench._common import CpuTimes
from bench.step_host_cpu import HttpRow, http_table


def test_the_http_table_shows_the_servers_cpu_per_token_in_microseconds() -> None:
    row = HttpRow(64, 2000.0, 0.02, 0.05, CpuTimes(process=75e-6, loop=60.5e-6), core=41.25e-6)
    alone = HttpRow(64, 2000.0, 0.02, 0.05, CpuTimes(process=75e-6, loop=60.5e-6))  # no core process
    header, _, line, thread = http_table([row, alone], {64: 1.0}).splitlines()
    assert header.endswith("| server CPU µs / token | loop CPU µs / token | core CPU µs / token |")
    assert line.endswith("| 2,000 | 75.0 | 60.5 | 41.2 |") and thread.endswith("| 75.0 | 60.5 | n/a |")
