"""FSDP2 (`fully_shard`) on two CPU processes over gloo trains HYDRA (MoD + MoR, weight-shared blocks, tied
embeddings) with the same per-step losses as one process (examples/fsdp2_cpu.py, docs/distributed.md)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "fsdp2_cpu.py")


def _run(tmp_path, nproc: int) -> dict:
    out = tmp_path / f"losses_{nproc}.json"
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1
                else [sys.executable])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([*launcher, SCRIPT, "--steps", "6", "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_fsdp2_two_cpu_processes_match_one(tmp_path):
    one, two = _run(tmp_path, 1), _run(tmp_path, 2)
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert len(one["losses"]) == len(two["losses"]) == 6
    assert max(abs(a - b) for a, b in zip(one["losses"], two["losses"])) < 1e-4
    assert two["losses"][-1] < two["losses"][0] - 0.5  # it learns (4.61 -> 3.11 in 6 steps)
