"""deploy/messenger-gpt-bot.service is a unit systemd accepts, pointing at the real command."""
import re
import shutil
import subprocess
import sys

import pytest

from tests.support import ROOT

UNIT = ROOT / "deploy" / "messenger-gpt-bot.service"


def test_the_unit_runs_the_readme_command():
    unit = UNIT.read_text()
    assert re.search(r"^ExecStart=/opt/messenger-gpt-bot/\.venv/bin/gunicorn -c gunicorn\.conf\.py server:app$",
                     unit, re.M)
    assert re.search(r"^Environment=HOST=127\.0\.0\.1$", unit, re.M)
    assert not re.search(r"^EnvironmentFile=", unit, re.M)  # its HOST would override the bind above
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M).group(1))
    assert stop >= 34 + 5  # the default graceful timeout (README) and the master's own margin


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_accepts_the_unit(tmp_path):
    # Installed where it says, on this machine: the venv's gunicorn, this checkout, root.
    gunicorn = ROOT / ".venv" / "bin" / "gunicorn"
    if not gunicorn.exists():
        gunicorn = shutil.which("gunicorn", path=str(ROOT / ".venv" / "bin")) or sys.executable
    unit = (UNIT.read_text().replace("/opt/messenger-gpt-bot/.venv/bin/gunicorn", str(gunicorn))
            .replace("/opt/messenger-gpt-bot", str(ROOT)).replace("User=messenger-bot", "User=root")
            .replace("Group=messenger-bot", "Group=root"))
    copy = tmp_path / "messenger-gpt-bot.service"
    copy.write_text(unit)
    checked = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and "messenger-gpt-bot" not in checked.stderr, checked.stderr
