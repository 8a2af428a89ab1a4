"""kill -9 while a checkpoint or a converted file is being written: the earlier good file survives.

The writer runs in a subprocess; the test watches for its temporary file and kills the
process at several moments of the write. After every kill the file the run points to
must load completely, as the old version or the new one, never a mixture or a torso.
"""

import glob
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time

import torch

from scalenet_d2 import ScaleNet, ScaleNetCheckpointer, load_allocation
from scalenet_d2.modeling.classification import ScaleNetClassifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DELAYS = (0.0, 0.005, 0.02, 0.05, 0.1, 0.2)  # after the temporary file appears

SAVER = """
import sys, torch
from scalenet_d2 import ScaleNet, ScaleNetCheckpointer
model = ScaleNet("scalenet50", norm="BN")  # about 100 MB of weights
with torch.no_grad():
    for p in model.parameters():
        p.fill_(2.0)
checkpointer = ScaleNetCheckpointer(model, sys.argv[1])
while True:
    checkpointer.save("model_final", iteration=1)
"""


def _kill_during_write(command, pattern, delay, env):
    """Start `command`, kill -9 it `delay` s after a file matching `pattern` appears.
    Returns whether the temporary file was still there at the kill (the write was cut)."""
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not glob.glob(pattern):
            if proc.poll() is not None:
                raise AssertionError(f"{command} ended before writing: {proc.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "no temporary file appeared"
            time.sleep(0.001)
        time.sleep(delay)
        cut = bool(glob.glob(pattern))
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    return cut


def _env():
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")


def test_kill_while_saving_the_final_checkpoint(tmp_path):
    model = ScaleNet("scalenet50", norm="BN")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    ScaleNetCheckpointer(model, str(tmp_path)).save("model_final", iteration=0)
    cut = 0
    for delay in DELAYS:
        cut += _kill_during_write(
            [sys.executable, "-c", SAVER, str(tmp_path)], str(tmp_path / ".model_final.*.tmp.pth"), delay, _env()
        )
        with open(tmp_path / "last_checkpoint") as f:
            assert f.read() == "model_final.pth"
        state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)
        values = {float(v.flatten()[0]) for k, v in state["model"].items() if k.endswith(".weight")}
        assert values in ({1.0}, {2.0}), values  # all old or all new
        assert state["iteration"] == (0 if values == {1.0} else 1)
    print(f"kill -9 during the final checkpoint's write: {len(DELAYS)} kills, {cut} mid-write, all survived")
    assert cut >= len(DELAYS) // 2  # most kills did land inside the write

    # a resumed run clears the temporary files the kills left
    leftovers = glob.glob(str(tmp_path / ".model_final.*.tmp.pth"))
    ScaleNetCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    assert leftovers and not any(os.path.exists(p) for p in leftovers)


def test_kill_while_the_converter_writes(tmp_path):
    classifier = ScaleNetClassifier(load_allocation("scalenet50"), num_classes=1000, norm="BN")
    torch.save(classifier.state_dict(), tmp_path / "ScaleNet-50.pth")
    old = pickle.dumps({"model": {}, "__author__": "an earlier conversion"})
    (tmp_path / "ScaleNet-50.pkl").write_bytes(old)
    command = [
        sys.executable,
        os.path.join(REPO, "tools", "convert_scalenet_to_d2.py"),
        str(tmp_path / "ScaleNet-50.pth"),
        str(tmp_path / "ScaleNet-50.pkl"),
    ]
    cut = 0
    for delay in DELAYS:
        (tmp_path / "ScaleNet-50.pkl").write_bytes(old)
        cut += _kill_during_write(command, str(tmp_path / ".ScaleNet-50.*.tmp.pkl"), delay, _env())
        data = (tmp_path / "ScaleNet-50.pkl").read_bytes()
        if hashlib.sha256(data).digest() != hashlib.sha256(old).digest():
            converted = pickle.loads(data)  # complete, or this raises
            assert converted["__author__"] == "scalenet_d2" and len(converted["model"]) == len(
                ScaleNet("scalenet50").state_dict()
            )
    print(f"kill -9 during the converter's write: {len(DELAYS)} kills, {cut} mid-write, all survived")
    assert cut >= len(DELAYS) // 2
