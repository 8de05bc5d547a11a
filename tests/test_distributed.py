"""Stage 2 under Accelerate with 2 CPU processes (torchrun + gloo) equals the single-process run.

Same global batch (``batch_size`` is split across processes), dropout off: the adapter, the training losses, the
validation metrics and the sharded test scores must agree up to float round-off.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

SCRIPT = Path(__file__).with_name("dist_finetune_script.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("objective", ["candidates", "sequence", "sequence-kd"])
def test_two_processes_match_one(tmp_path: Path, objective: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    one = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path / "one"), objective], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                            "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(SCRIPT),
                            str(tmp_path / "two"), objective], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    out_one, _ = one.communicate(timeout=120)
    out_two, _ = two.communicate(timeout=120)
    assert one.returncode == 0, out_one[-3000:]
    assert two.returncode == 0, out_two[-3000:]

    r1, r2 = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("one", "two"))
    assert (r1["processes"], r2["processes"]) == (1, 2)
    h1, h2 = (json.loads((tmp_path / d / "finetune" / "history.json").read_text()) for d in ("one", "two"))
    assert (h1["processes"], h2["processes"]) == (1, 2)
    assert h1["steps"] == h2["steps"] == 6
    np.testing.assert_allclose([e["loss"] for e in h2["history"]], [e["loss"] for e in h1["history"]],
                               rtol=1e-5, atol=1e-5)
    for m in ("HR@1", "HR@5", "NDCG@5"):
        assert abs(h1["best"][m] - h2["best"][m]) < 1e-6
    a1 = load_file(str(tmp_path / "one" / "finetune" / "adapter" / "adapter_model.safetensors"))
    a2 = load_file(str(tmp_path / "two" / "finetune" / "adapter" / "adapter_model.safetensors"))
    assert a1.keys() == a2.keys() and a1
    for k in a1:
        np.testing.assert_allclose(a2[k], a1[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # Evaluation was sharded over the 2 processes and gathered back in row order.
    assert r1["candidate_hash"] == r2["candidate_hash"] and r1["n"] == r2["n"] == 6
    np.testing.assert_allclose(np.array(r2["scores"]), np.array(r1["scores"]), rtol=1e-4, atol=1e-5)
    assert r1["ranks"] == r2["ranks"]
