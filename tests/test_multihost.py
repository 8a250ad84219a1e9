"""Many hosts on one machine: two processes with two CPU devices each (gloo on 127.0.0.1) against one process with
four devices; and frozen weights sharded over `fsdp` against replicated ones."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_train import make_concept
from tests.xla_flags import with_devices

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out, concepts, model, devices, pid, nproc, port, **options):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "tests.multihost_worker", str(out), str(concepts), str(model), str(devices),
            str(pid), str(nproc), str(port), json.dumps(options)]
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _result(proc):
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-5000:]
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory, tiny_dirs):
    """Four concepts trained by two hosts of two devices each, and by one host of four devices."""
    tmp_path = tmp_path_factory.mktemp("hosts")
    concepts = tmp_path / "concepts"
    for i, name in enumerate("abcd"):
        make_concept(concepts / name, i, n=3)
    model = tiny_dirs("sd1")
    port = _free_port()
    hosts = [_start(tmp_path / "multi", concepts, model, 2, pid, 2, port) for pid in range(2)]
    single = _start(tmp_path / "single", concepts, model, 4, 0, 1, 0)
    r0, r1 = (_result(p) for p in hosts)
    return tmp_path, concepts, model, r0, r1, _result(single)


def test_two_hosts_match_one_host(two_hosts):
    tmp_path, concepts, model, r0, r1, ref = two_hosts

    for token, want in ref["vectors"].items():
        for got in (r0["vectors"][token], r1["vectors"][token]):
            rel = np.abs(np.array(got) - np.array(want)).max() / np.abs(np.array(want)).max()
            print(f"{token}: 2 hosts vs 1 host max relative {rel:.2e}")
            assert rel < 1e-5
    # Each host decoded only the images of the concepts its devices train (four concepts over four devices).
    all_images = sorted(str(p) for p in concepts.rglob("*.png"))
    assert ref["images"] == all_images
    assert set(r0["images"]).isdisjoint(r1["images"])
    assert sorted(r0["images"] + r1["images"]) == all_images
    assert {Path(p).parent.name for p in r0["images"]} == {"a", "b"}
    # Only process 0 writes the run's files. (Inside orbax checkpoints each process records its own array metadata,
    # `array_metadatas/process_<i>`: orbax's protocol, not a second copy of anything.)
    assert [w for w in r1["writes"] if "array_metadatas/process_1" not in w] == []
    assert any(w.endswith("config.yaml") for w in r0["writes"])
    assert (tmp_path / "multi" / "learned_embeds.safetensors").exists() is False  # several concepts: one file each
    assert len(list((tmp_path / "multi" / "embeddings").iterdir())) == 4


def test_fsdp_sharded_frozen_weights_match_replicated(tmp_path, tiny_dirs):
    script = (
        "import os, sys, json\n"
        f"os.environ['XLA_FLAGS']={with_devices(4)!r}\n"
        "from train.config import TrainConfig\n"
        "from train.invert import run\n"
        "out = {}\n"
        "for fsdp in (1, 2, 4):\n"
        f"    cfg = TrainConfig(model={str(tiny_dirs('sd1'))!r}, images=sys.argv[1], token='<t>', init='cat',\n"
        "                      out=sys.argv[2] + str(fsdp), steps=3, batch_size=4, validate_every=0, fsdp=fsdp)\n"
        "    out[fsdp] = run(cfg, progress=False).vectors['<t>']['text_encoder'].tolist()\n"
        "print('RESULT ' + json.dumps(out))\n"
    )
    images = make_concept(tmp_path / "img", 0)
    proc = subprocess.Popen([sys.executable, "-c", script, str(images), str(tmp_path / "run")], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    res = _result(proc)
    ref = np.array(res["1"])
    for fsdp in ("2", "4"):
        rel = np.abs(np.array(res[fsdp]) - ref).max() / np.abs(ref).max()
        print(f"fsdp={fsdp} vs replicated: max relative {rel:.2e}")
        assert rel < 1e-5


def test_sigterm_on_one_host_stops_both_at_the_same_step_and_resume_is_bitwise(tmp_path, two_hosts):
    _, concepts, model, uninterrupted, _, _ = two_hosts
    port = _free_port()
    # Host 1 alone is sent SIGTERM after step 2 (of 4; checkpoints every 2): both hosts learn of it after step 3.
    hosts = [_start(tmp_path / "run", concepts, model, 2, pid, 2, port, **({"sigterm_at": 2} if pid else {}))
             for pid in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in hosts]
    for proc, out in zip(hosts, outs, strict=True):
        assert proc.returncode == 75, out[-5000:]
        assert "STOPPED stopped by SIGTERM: saved step 3" in out, out[-5000:]
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints" / "wave-000").iterdir() if p.name.isdigit())
    assert saved == [2, 3]

    port = _free_port()
    hosts = [_start(tmp_path / "run", concepts, model, 2, pid, 2, port, resume=True) for pid in range(2)]
    for result in [_result(p) for p in hosts]:
        for token, want in uninterrupted["vectors"].items():
            np.testing.assert_array_equal(np.array(result["vectors"][token]), np.array(want), err_msg=token)
