"""scripts/tpu/tpu.py: the gcloud commands its dry runs print, and that a real run executes exactly those (against a
stand-in gcloud that records its arguments; the real one is never called)."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "tpu" / "tpu.py"
WHERE = ["--name", "my-tpu", "--zone", "us-west4-a"]
INVERT = ["--model", "stabilityai/stable-diffusion-2-1", "--concepts", "gs://bucket/concepts", "--token", "<my-cat>",
          "--init", "a cat", "--set", "validation_prompt=a photo of {} it's $HOME `x`", "--out", "gs://bucket/run"]


def tpu(*args, env=None, check=True):
    base = {k: v for k, v in os.environ.items() if not k.startswith("TIX_TPU_")}
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**base, **(env or {})}, timeout=60)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def dry(*args, **kw) -> list[list[str]]:
    """The printed commands, split as a shell would split them."""
    cut = args.index("--") if "--" in args else len(args)
    out = tpu(*args[:cut], "--dry-run", *args[cut:], **kw).stdout
    return [shlex.split(line, comments=True) for line in out.splitlines() if line.strip()]


def shell_words(line: str) -> list[str]:
    """Words as a POSIX shell reads them, with ; | & ( ) as separate words."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def flag(command, name):
    values = [a.split("=", 1)[1] for a in command if a.startswith(name + "=")]
    assert len(values) == 1, (name, command)
    return values[0]


def test_create():
    (c,) = dry("create", *WHERE, "--accelerator", "v5litepod-8")
    assert c[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu"]
    assert flag(c, "--zone") == "us-west4-a"
    assert flag(c, "--accelerator-type") == "v5litepod-8"
    assert flag(c, "--version") == "v2-alpha-tpuv5-lite"
    assert "--spot" not in c and not any(a.startswith("--project") for a in c)

    (c,) = dry("create", *WHERE, "--accelerator", "v4-32", "--spot", "--project", "my-proj")
    assert flag(c, "--version") == "tpu-ubuntu2204-base"
    assert flag(c, "--accelerator-type") == "v4-32"
    assert "--spot" in c and flag(c, "--project") == "my-proj"
    (c,) = dry("create", *WHERE, "--accelerator", "v6e-8", "--version", "my-runtime")
    assert flag(c, "--version") == "my-runtime"

    # A queued resource named like its node, waiting for ACTIVE.
    c, wait = dry("create", *WHERE, "--accelerator", "v5litepod-16", "--queued", "--spot", "--wait")
    assert c[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu"]
    assert flag(c, "--node-id") == "my-tpu"
    assert flag(c, "--runtime-version") == "v2-alpha-tpuv5-lite"
    assert flag(c, "--accelerator-type") == "v5litepod-16" and "--spot" in c
    assert wait[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "my-tpu"]

    # Name and zone from the environment.
    (c,) = dry("create", env={"TIX_TPU_NAME": "env-tpu", "TIX_TPU_ZONE": "europe-west4-b"})
    assert c[5] == "env-tpu" and flag(c, "--zone") == "europe-west4-b"


def test_install_builds_this_checkout_and_installs_on_every_worker():
    build, scp, ssh = dry("install", *WHERE)
    assert build[1:] == ["-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(ROOT / "dist"), str(ROOT)]
    wheel = Path(scp[5])
    assert wheel.parent == ROOT / "dist" and wheel.name.startswith("tix-") and wheel.name.endswith("-py3-none-any.whl")
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[6] == "my-tpu:"
    assert "--worker=all" in scp and flag(scp, "--zone") == "us-west4-a"
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"] and "--worker=all" in ssh
    words = shell_words(flag(ssh, "--command"))
    assert f"tix-venv/bin/python -m pip install -U ./{wheel.name}[tpu] ;" in " ".join(words)

    *_, ssh = dry("install", *WHERE, "--git", "https://github.com/me/tix@v0.1", "--extras", "tpu,tfds",
                  "--venv", "envs/tix")
    words = shell_words(flag(ssh, "--command"))
    assert "tix[tpu,tfds] @ git+https://github.com/me/tix@v0.1" in words
    assert "envs/tix/bin/tix" in words


def test_run_passes_invert_arguments_through_unchanged(tmp_path):
    (c,) = dry("run", *WHERE, "--", *INVERT)
    assert c[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=all" in c and flag(c, "--zone") == "us-west4-a"
    # What each worker's shell receives splits back into exactly these arguments: '<my-cat>', spaces, quotes, $.
    assert shlex.split(flag(c, "--command")) == ["tix-venv/bin/tix", "invert", *INVERT]

    # And a real shell (as on a worker) hands tix exactly those arguments.
    tix = tmp_path / "tix-venv" / "bin" / "tix"
    tix.parent.mkdir(parents=True)
    tix.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    tix.chmod(0o755)
    shell = subprocess.run(["bash", "-c", flag(c, "--command")], cwd=tmp_path, capture_output=True, text=True)
    assert json.loads(shell.stdout) == ["invert", *INVERT], shell.stderr

    (c,) = dry("run", *WHERE, "--detach", "--env", "JAX_TRACEBACK_FILTERING=off", "--", *INVERT)
    words = shlex.split(flag(c, "--command"))
    assert words[:4] == ["nohup", "env", "JAX_TRACEBACK_FILTERING=off", "tix-venv/bin/tix"]
    assert words[4:5 + len(INVERT)] == ["invert", *INVERT]
    assert words[5 + len(INVERT):5 + len(INVERT) + 5] == [">", "tix-invert.log", "2>&1", "<", "/dev/null"]

    # A local --out lands on worker 0 only: said, not refused.
    done = tpu("run", *WHERE, "--dry-run", "--", "--images", "cat", "--token", "<c>", "--out", "runs/cat")
    assert "worker 0" in done.stderr
    assert "worker 0" not in tpu("run", *WHERE, "--dry-run", "--", *INVERT).stderr
    # A --dry-run written after -- is still this script's (tix invert has none): nothing is launched.
    assert dry("run", *WHERE, "--", *INVERT) == [shlex.split(tpu("run", *WHERE, "--", *INVERT, "--dry-run").stdout)]


def test_plan_compiles_the_invert_arguments_for_the_slice_here():
    (c,) = dry("plan", "--accelerator", "v4-8", "--", *INVERT)
    assert c[0] == sys.executable and c[1:4] == ["-m", "tix.cli", "invert"]
    assert c[4:-2] == INVERT  # passed through unchanged, quotes and all
    assert c[-2:] == ["--compile-only", "--target=v4-8"]
    (default,) = dry("plan", "--", *INVERT)
    assert default[-1] == "--target=v5litepod-8"  # the slice `create` makes by default
    done = tpu("plan", "--dry-run", check=False)
    assert done.returncode == 1 and "after --" in done.stderr


def test_plan_exits_with_tix_invert_status():
    """`tix invert --compile-only` says 3 for a step that does not fit and 2 for a usage error; plan passes it on
    (a usage error here: the quickest real `tix invert` to start)."""
    done = tpu("plan", "--", "--no-such-flag", check=False)
    assert done.returncode == 2, done.stderr
    assert "unrecognized arguments: --no-such-flag" in done.stderr and "--target=v5litepod-8" in done.stderr


def test_fetch_and_delete():
    mkdir, sync = dry("fetch", "--src", "gs://bucket/run", "--dest", "runs/run")
    assert mkdir == ["mkdir", "-p", "runs/run"]
    assert sync == ["gcloud", "storage", "rsync", "--recursive", "gs://bucket/run", "runs/run"]
    _, sync = dry("fetch", "--src", "gs://bucket/run", "--dest", "runs/run", "--gsutil")
    assert sync == ["gsutil", "-m", "rsync", "-r", "gs://bucket/run", "runs/run"]
    _, scp = dry("fetch", *WHERE, "--src", "runs/cat", "--dest", "here")
    assert scp[4:8] == ["scp", "--recurse", "my-tpu:runs/cat", "here"] and "--worker=0" in scp

    (d,) = dry("delete", *WHERE)
    assert d == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone=us-west4-a", "--quiet"]
    (d,) = dry("delete", *WHERE, "--queued")
    assert d[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu"]
    assert "--force" in d and "--quiet" in d


def test_usage_errors():
    done = tpu("delete", "--zone", "z", "--dry-run", check=False)
    assert done.returncode == 1 and "--name" in done.stderr and "TIX_TPU_NAME" in done.stderr
    done = tpu("run", *WHERE, "--dry-run", check=False)
    assert done.returncode == 1 and "after --" in done.stderr
    done = tpu("create", *WHERE, "--accelerator", "v9z-8", "--dry-run", check=False)
    assert done.returncode == 1 and "--version" in done.stderr
    done = tpu("run", *WHERE, "--env", "NOEQUALS", "--dry-run", "--", "--images", "x", check=False)
    assert done.returncode == 1 and "NAME=VALUE" in done.stderr


@pytest.fixture
def fake_gcloud(tmp_path):
    """gcloud/gsutil stand-ins first on PATH: each records its argv; `describe` answers ACTIVE."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    for name in ("gcloud", "gsutil"):
        tool = bin_dir / name
        tool.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        f"open(os.environ['FAKE_LOG'], 'a').write(json.dumps([{name!r}, *sys.argv[1:]]) + '\\n')\n"
                        "if 'describe' in sys.argv: print('ACTIVE')\n")
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "FAKE_LOG": str(log)}

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return env, calls


@pytest.mark.parametrize("args", [
    ["create", *WHERE, "--accelerator", "v4-32", "--queued", "--spot", "--wait"],
    ["install", *WHERE, "--wheel", str(SCRIPT), "--extras", "tpu,tfds"],
    ["run", *WHERE, "--", *INVERT],
    ["fetch", "--src", "gs://bucket/run", "--dest", "{tmp}/out"],
    ["delete", *WHERE, "--queued"],
])
def test_real_run_executes_the_dry_run_commands(args, fake_gcloud, tmp_path):
    env, calls = fake_gcloud
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    printed = [c for c in dry(*args, env=env) if c[0] in ("gcloud", "gsutil")]
    assert calls() == []  # a dry run runs nothing
    tpu(*args, env=env)
    assert calls() == printed


def test_without_gcloud_a_clear_error(tmp_path):
    done = tpu("delete", *WHERE, env={"PATH": str(tmp_path)}, check=False)
    assert done.returncode == 1 and "gcloud not found" in done.stderr and "--dry-run" in done.stderr


RETRY = ["run", *WHERE, "--retry", "3", "--accelerator", "v5litepod-16", "--spot", "--wheel", str(SCRIPT),
         "--retry-wait", "0"]


def test_retry_dry_run_prints_the_recovery(tmp_path):
    plan = dry(*RETRY, "--", *INVERT)
    first, describe, delete, create, scp, install, resume = [c for c in plan if c]
    assert first == dry("run", *WHERE, "--", *INVERT)[0]
    assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "my-tpu"]
    assert delete[4:6] == ["delete", "my-tpu"]
    assert create[4:6] == ["create", "my-tpu"] and "--spot" in create
    assert flag(create, "--accelerator-type") == "v5litepod-16"
    assert scp[4] == "scp" and "--worker=all" in install and "pip install" in flag(install, "--command")
    # The resumed run: the same arguments plus --resume once the bucket holds the run's config.yaml, else as given
    # (a run stopped before it began has nothing to resume). Checked with a real shell and stand-in tools.
    line = flag(resume, "--command")
    venv = tmp_path / "tix-venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "tix").write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    (venv / "python").write_text(f"#!{sys.executable}\nimport os, sys\n"
                                 "sys.exit(0 if sys.argv[-1] in os.environ.get('EXISTS', '') else 1)\n")
    for tool in venv.iterdir():
        tool.chmod(0o755)
    for exists, want in (("gs://bucket/run/config.yaml", [*INVERT, "--resume"]), ("", INVERT)):
        shell = subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True,
                               env={**os.environ, "EXISTS": exists})
        assert json.loads(shell.stdout) == ["invert", *want], shell.stderr
    # A --retry needs an --out that outlives the TPU, and someone watching.
    done = tpu(*RETRY, "--dry-run", "--", "--images", "cat", "--token", "<c>", "--out", "runs/cat", check=False)
    assert done.returncode == 1 and "gs://" in done.stderr
    done = tpu(*RETRY, "--detach", "--dry-run", "--", *INVERT, check=False)
    assert done.returncode == 1 and "--detach" in done.stderr


@pytest.fixture
def preemptible_gcloud(tmp_path):
    """A gcloud stand-in for one Spot TPU: the first `tix invert` ssh is cut by a preemption (status 255, TPU
    PREEMPTED), the first create after it finds no capacity; then everything succeeds. Records every call."""
    log, state = tmp_path / "calls.jsonl", tmp_path / "state.json"
    state.write_text(json.dumps({"tpu": "READY", "runs": 0, "creates": 0}))
    tool = tmp_path / "bin" / "gcloud"
    tool.parent.mkdir()
    tool.write_text(f"#!{sys.executable}\n" + """import json, os, sys
args = sys.argv[1:]
open(os.environ['FAKE_LOG'], 'a').write(json.dumps(['gcloud', *args]) + '\\n')
path = os.environ['FAKE_STATE']
s = json.load(open(path))
code = 0
if 'describe' in args:
    print(s['tpu']) if s['tpu'] else sys.exit(1)
elif 'delete' in args:
    s['tpu'] = ''
elif 'create' in args:
    s['creates'] += 1
    if s['creates'] == 1:
        code = 1
    else:
        s['tpu'] = 'READY'
elif 'ssh' in args and 'invert' in args[-1]:
    s['runs'] += 1
    if os.environ.get('FAKE_FAIL'):
        code = int(os.environ['FAKE_FAIL'])
    elif s['runs'] == 1:
        s['tpu'], code = 'PREEMPTED', 255
json.dump(s, open(path, 'w'))
sys.exit(code)
""")
    tool.chmod(0o755)
    env = {"PATH": f"{tool.parent}{os.pathsep}/usr/bin{os.pathsep}/bin", "FAKE_LOG": str(log), "FAKE_STATE": str(state)}
    return env, lambda: [json.loads(line) for line in log.read_text().splitlines()]


def test_retry_recreates_a_preempted_tpu_and_resumes(preemptible_gcloud):
    env, calls = preemptible_gcloud
    plan = [c for c in dry(*RETRY, "--", *INVERT, env=env) if c]
    done = tpu(*RETRY, "--", *INVERT, env=env)
    assert "no capacity" in done.stderr
    run, describe, delete, create, scp, install, resume = plan
    # Exactly the planned commands, with the create repeated once for capacity.
    assert calls() == [run, describe, delete, create, create, scp, install, resume]


def test_retry_does_not_repeat_a_failing_run(preemptible_gcloud):
    env, calls = preemptible_gcloud
    done = tpu(*RETRY, "--", *INVERT, env={**env, "FAKE_FAIL": "2"}, check=False)  # as a bad input fails
    assert done.returncode == 1 and "not retrying" in done.stderr
    assert [c[4] for c in calls()] == ["ssh", "describe"]
