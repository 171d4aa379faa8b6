"""A training process killed with SIGKILL mid-run resumes from its last checkpoint and ends with
the ε and the weights of an uninterrupted run (same seeds)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "resume_script.py"
STEPS = 30


def _run(*args: str, wait: bool = True) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if wait:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode()[-3000:]
    return proc


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    _run(str(full), str(STEPS))

    proc = _run(str(killed), str(STEPS), "--sleep", "0.3", wait=False)
    last = killed / "ckpt" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert last.exists(), "the run never wrote a checkpoint"
    time.sleep(2.0)  # let it train (and write checkpoints) a little further, then kill
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (killed / "final.pt").exists()
    leftovers = [p.name for p in (killed / "ckpt").iterdir() if p.name != "last.ckpt"]
    checkpoint = torch.load(last, weights_only=False)
    assert 0 < checkpoint["global_step"] < STEPS, leftovers

    _run(str(killed), str(STEPS), "--ckpt", str(last))
    a = torch.load(full / "final.pt")
    b = torch.load(killed / "final.pt")
    assert a["steps"] == b["steps"] == STEPS
    assert a["epsilon"] == b["epsilon"]
    for name, value in a["state"].items():
        torch.testing.assert_close(b["state"][name], value, rtol=0, atol=0, msg=name)
