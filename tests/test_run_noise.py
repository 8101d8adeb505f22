"""torchrun's own log lines about stopping workers and copying error files ("E1205 ... error_handler.py", "W1205 ...
Sending process N closing signal SIGTERM", "Received 15 death signal") stay out of a failed or interrupted
`tpcli run`: tpcli says the same in its report. They are still handed to the report (agent_lines)."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest
from conftest import base_env

from tpcli.commands.job_watch import pump_output

TORCHRUN_LINES = [  # as torch 2.13's torchrun writes them
    "W1205 10:01:02.076000 13916 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 13957 "
    "closing signal SIGTERM\n",
    "E1205 10:01:02.274000 13916 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) "
    "local_rank: 1 (pid: 13958) of binary: /usr/bin/python\n",
    "E1205 10:01:02.319000 13916 torch/distributed/elastic/multiprocessing/errors/error_handler.py:145] no error "
    "file defined for parent, to copy child error file (/tmp/x/error.json)\n",
    "W1205 10:01:02.148000 14411 torch/distributed/elastic/agent/server/api.py:753] Received 15 death signal, "
    "shutting down workers\n",
]
KEPT = ["[rank1]:ValueError: boom\n",
        "W1205 10:01:00.000000 1 torch/distributed/elastic/rendezvous/dynamic_rendezvous.py:1] rendezvous timed out\n"]


def test_torchruns_worker_lines_are_kept_for_the_report_not_shown():
    shown, agent = io.StringIO(), []
    pump_output(io.StringIO("".join([KEPT[0], *TORCHRUN_LINES, KEPT[1]])), shown, agent, {})
    assert shown.getvalue() == "".join(KEPT)  # a rendezvous problem is still shown: tpcli does not report it
    assert [ln + "\n" for ln in agent] == [*TORCHRUN_LINES, KEPT[1]]


@pytest.mark.dist
def test_a_failed_run_shows_no_torchrun_log_lines(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import os\nif os.environ['RANK'] == '1':\n    raise ValueError('boom')\n"
                      "import time\ntime.sleep(5)\n")
    proc = subprocess.run([sys.executable, "-m", "tpcli", "run", "--cpu", "2", str(script)], capture_output=True,
                          text=True, env=base_env(), timeout=240)
    assert proc.returncode == 1 and "tpcli run: rank 1 failed, exit code 1: ValueError: boom" in proc.stderr
    logged = [ln for ln in (proc.stderr + proc.stdout).splitlines() if re.match(r"[IWE]\d{4} .*torch/distributed", ln)]
    assert logged == [], proc.stderr
    # the root cause's traceback once (the report's, user frames only); the rank's own stream has one line
    everything = proc.stderr + proc.stdout
    assert everything.count("Traceback (most recent call last)") == 1, everything
    assert "[rank1]:ValueError: boom  (traceback: tpcli's failure report" in everything
    assert "bootstrap.py" not in everything and "runpy" not in everything
