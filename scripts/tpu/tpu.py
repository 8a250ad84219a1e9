#!/usr/bin/env python3
"""Run tix on a Cloud TPU VM or pod slice with gcloud: create it, install tix on every worker, launch `tix invert`
on all workers at once, bring the outputs back, delete it.

Every subcommand takes --dry-run, which prints the exact commands instead of running them. Only the Python standard
library is used, so this runs on any machine with the Google Cloud CLI (and without it, for --dry-run).

  python scripts/tpu/tpu.py plan    --accelerator v5litepod-8 -- --model ... --images ... --token '<my-cat>'
  python scripts/tpu/tpu.py create  --name my-tpu --zone us-west4-a --accelerator v5litepod-8 [--spot] [--queued]
  python scripts/tpu/tpu.py install --name my-tpu --zone us-west4-a            # builds a wheel of this checkout
  python scripts/tpu/tpu.py run     --name my-tpu --zone us-west4-a -- --model ... --out gs://bucket/run
  python scripts/tpu/tpu.py run     --name my-tpu --zone us-west4-a --retry 10 --accelerator v5litepod-8 --spot \
                                    -- --model ... --out gs://bucket/run    # survives preemption
  python scripts/tpu/tpu.py fetch   --src gs://bucket/run --dest runs/run
  python scripts/tpu/tpu.py delete  --name my-tpu --zone us-west4-a [--queued]

--name, --zone and --project default to $TIX_TPU_NAME, $TIX_TPU_ZONE and $TIX_TPU_PROJECT.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
QUEUED = ["gcloud", "compute", "tpus", "queued-resources"]
# The TPU software version (runtime) Google lists for JAX per TPU generation; --version overrides it.
RUNTIMES = [("v6e", "v2-alpha-tpuv6e"), ("v5litepod", "v2-alpha-tpuv5-lite"), ("v5e", "v2-alpha-tpuv5-lite"),
            ("v5p", "v2-alpha-tpuv5"), ("v4", "tpu-ubuntu2204-base"), ("v3", "tpu-ubuntu2204-base"),
            ("v2", "tpu-ubuntu2204-base")]
LOG = "tix-invert.log"  # on each worker, for --detach
STOPPED = 75  # `tix invert`'s exit status after saving on SIGTERM (train/stop.py)
SSH_FAILED = 255  # ssh's own failure: the connection dropped, as when the VM goes away


class Fail(Exception):
    """A usage or environment problem, reported as one line."""


def runtime_for(accelerator: str) -> str:
    for prefix, runtime in RUNTIMES:
        if accelerator.startswith(prefix + "-"):
            return runtime
    raise Fail(f"no default runtime for accelerator {accelerator!r}; pass --version "
               f"(see Cloud TPU's 'TPU software versions' page)")


def _where(args: argparse.Namespace, *, name: bool = True) -> list[str]:
    """The zone/project flags every gcloud TPU command takes."""
    if name and not args.name:
        raise Fail("give the TPU name: --name NAME (or set TIX_TPU_NAME)")
    if not args.zone:
        raise Fail("give the zone: --zone ZONE, e.g. us-west4-a (or set TIX_TPU_ZONE)")
    return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def _ssh_all(args: argparse.Namespace, remote: str) -> list[str]:
    # Every worker runs the same command at the same time: that is how a multi-host JAX program is started.
    return TPU_VM + ["ssh", args.name, *_where(args), "--worker=all", f"--command={remote}"]


# ---- create


def create(args: argparse.Namespace) -> list[list[str]]:
    runtime = args.version or runtime_for(args.accelerator)
    extra = (["--spot"] if args.spot else []) + ([f"--labels={args.labels}"] if args.labels else [])
    if args.queued:
        # Queued resources wait for capacity instead of failing when there is none; the node gets the same name.
        return [QUEUED + ["create", args.name, f"--node-id={args.name}", *_where(args),
                          f"--accelerator-type={args.accelerator}", f"--runtime-version={runtime}", *extra]]
    return [TPU_VM + ["create", args.name, *_where(args), f"--accelerator-type={args.accelerator}",
                      f"--version={runtime}", *extra]]


def wait_command(args: argparse.Namespace) -> list[str]:
    return QUEUED + ["describe", args.name, *_where(args), "--format=value(state.state)"]


def wait_active(args: argparse.Namespace, timeout_s: float = 3 * 3600, every_s: float = 30) -> None:
    """Poll a queued resource until it is ACTIVE (its TPU VMs exist)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = subprocess.run(wait_command(args), check=True, capture_output=True, text=True).stdout.strip()
        print(f"queued resource {args.name}: {state}", file=sys.stderr)
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            raise Fail(f"queued resource {args.name} is {state}; see `{shlex.join(wait_command(args)[:-1])}`")
        if time.monotonic() > deadline:
            raise Fail(f"queued resource {args.name} still {state} after {timeout_s / 3600:.1f} h")
        time.sleep(every_s)


# ---- install


def project_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'^\[project\][^\[]*?^version\s*=\s*"([^"]+)"', text, re.M | re.S)
    if not match:
        raise Fail(f"no [project] version in {REPO / 'pyproject.toml'}")
    return match[1]


def _venv_setup(venv: str) -> str:
    v = shlex.quote(venv)
    # TPU VM images ship python3 but not always its venv module.
    return (f"(test -x {v}/bin/python || python3 -m venv {v} || (sudo apt-get update -qq && "
            f"sudo apt-get install -y -qq python3-venv && python3 -m venv {v}))")


def install(args: argparse.Namespace) -> list[list[str]]:
    extras = f"[{args.extras}]" if args.extras else ""
    commands = []
    if args.git:
        requirement = f"tix{extras} @ git+{args.git}"
    elif args.pip:
        requirement = args.pip
    else:
        if args.wheel:
            package = Path(args.wheel)
        else:
            # This checkout, as a wheel: the workers get exactly the code here, no repository access needed.
            dist = REPO / "dist"
            package = dist / f"tix-{project_version()}-py3-none-any.whl"
            commands.append([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(dist), str(REPO)])
        if not re.fullmatch(r"[A-Za-z0-9._+-]+", package.name):
            raise Fail(f"package file name {package.name!r}: use letters, digits and ._+- only")
        commands.append(TPU_VM + ["scp", str(package), f"{args.name}:", *_where(args), "--worker=all"])
        requirement = f"./{package.name}{extras}"  # scp puts it in the home folder, where ssh commands start
    venv = shlex.quote(args.venv)
    remote = (f"set -e; {_venv_setup(args.venv)}; {venv}/bin/python -m pip install -q -U pip; "
              f"{venv}/bin/python -m pip install -U {shlex.quote(requirement)}; "
              f"{venv}/bin/tix --help > /dev/null; echo \"tix installed on $(hostname)\"")
    commands.append(_ssh_all(args, remote))
    return commands


# ---- run


def remote_invert(args: argparse.Namespace, invert_args: list[str]) -> str:
    """The shell line each worker runs. Every argument is quoted for the worker's shell, so tokens such as
    '<my-cat>' or prompts with spaces and quotes arrive unchanged."""
    env = [shlex.quote(e) for e in args.env]
    for e in args.env:
        if "=" not in e or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", e.split("=", 1)[0]):
            raise Fail(f"--env {e!r}: expected NAME=VALUE")
    command = " ".join([*(["env", *env] if env else []), f"{shlex.quote(args.venv)}/bin/tix", "invert",
                        *map(shlex.quote, invert_args)])
    if args.detach:
        # Survives the ssh session ending (a laptop going to sleep); output goes to a log file on each worker.
        return f"nohup {command} > {LOG} 2>&1 < /dev/null & echo \"started on $(hostname), log: ~/{LOG}\""
    return command


def run(args: argparse.Namespace) -> list[list[str]]:
    if not args.invert_args:
        raise Fail("give the `tix invert` arguments after --, e.g. run --name N --zone Z -- --model M --images "
                   "gs://b/cat --token '<my-cat>' --out gs://b/run")
    out = _flag_value(args.invert_args, "--out")
    if args.retry:
        if out is None or not out.startswith("gs://"):
            raise Fail("--retry resumes from the checkpoints in --out, which must outlive the TPU: give a gs:// --out")
        if args.detach:
            raise Fail("--retry watches the run, so it cannot --detach; run this script itself in the background")
    elif out is None or not out.startswith("gs://"):
        print(f"note: --out {out or '(default runs/demo)'} is on worker 0's disk (only process 0 writes); use a "
              f"gs:// path to write to Cloud Storage, or `fetch --src PATH` to copy it from worker 0",
              file=sys.stderr)
    return [_ssh_all(args, remote_invert(args, args.invert_args))]


def remote_resume(args: argparse.Namespace) -> str:
    """The shell line each worker runs after a preemption: the same `tix invert` with --resume if the run folder
    already holds a run (its config.yaml), else as first given (it was stopped before it started)."""
    if "--resume" in args.invert_args:
        return remote_invert(args, args.invert_args)
    config = _flag_value(args.invert_args, "--out").rstrip("/") + "/config.yaml"
    probe = (f"{shlex.quote(args.venv)}/bin/python -c "
             f"{shlex.quote('import sys; from tix import fs; sys.exit(not fs.exists(sys.argv[1]))')} "
             f"{shlex.quote(config)}")
    return (f"if {probe}; then {remote_invert(args, [*args.invert_args, '--resume'])}; "
            f"else {remote_invert(args, args.invert_args)}; fi")


def state_command(args: argparse.Namespace) -> list[str]:
    return TPU_VM + ["describe", args.name, *_where(args), "--format=value(state)"]


def recreate(args: argparse.Namespace) -> list[list[str]]:
    """Delete the preempted TPU (a preempted TPU VM stays, in state PREEMPTED, until deleted) and create it again."""
    return delete(args) + create(args)


def run_with_retry(args: argparse.Namespace) -> None:
    """Run; whenever the TPU is preempted, wait for capacity, recreate it, reinstall tix and resume from the
    checkpoints in the bucket, up to --retry times. A run that fails on a healthy TPU is not retried."""
    command = _ssh_all(args, remote_invert(args, args.invert_args))
    for attempt in range(args.retry + 1):
        status = _status(command)
        if status == 0:
            return
        state = _tpu_state(args)
        if state == "READY" and status not in (STOPPED, SSH_FAILED):
            raise Fail(f"tix invert failed (status {status}) on a healthy TPU; not retrying")
        if attempt == args.retry:
            break
        print(f"tpu.py: run stopped (status {status}, TPU {state or 'gone'}); resuming "
              f"({attempt + 1} of {args.retry})", file=sys.stderr, flush=True)
        if state != "READY":
            _status(delete(args)[0])  # may already be gone
            _create_when_capacity(args)
            execute(install(args))
        command = _ssh_all(args, remote_resume(args))
    raise Fail(f"the run was stopped {args.retry + 1} times; resume it with the same command")


def _tpu_state(args: argparse.Namespace) -> str:
    done = subprocess.run(state_command(args), capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def _create_when_capacity(args: argparse.Namespace) -> None:
    while True:
        if _status(create(args)[0]) == 0:
            break
        print(f"tpu.py: no capacity for {args.accelerator} yet; trying again in {args.retry_wait:.0f} s",
              file=sys.stderr, flush=True)
        time.sleep(args.retry_wait)
    if args.queued:
        wait_active(args)


def retry_plan(args: argparse.Namespace) -> list[str]:
    """What --retry does, as the dry run prints it: the commands, and when each runs."""
    line = shlex.join
    plan = [line(c) for c in run(args)]
    plan.append(f"# if it stops (TPU not READY, or status {STOPPED} or {SSH_FAILED}), up to {args.retry} times:")
    plan.append(line(state_command(args)))
    plan += [f"{line(c)}  # when the TPU is not READY" for c in delete(args)]
    plan += [f"{line(c)}  # repeated every {args.retry_wait:.0f} s until there is capacity" for c in create(args)]
    if args.queued:
        plan.append(f"{line(wait_command(args))}  # repeated until ACTIVE")
    plan += [line(c) for c in install(args)]
    plan.append(line(_ssh_all(args, remote_resume(args))))
    return plan


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


# ---- plan


def plan(args: argparse.Namespace) -> list[list[str]]:
    """Compile the run's train step for the slice on this machine (needs tix and libtpu here, not a TPU) and say
    whether it fits, before a slice is rented. Its exit status is tix's: 0 fits, 3 does not, 2 a usage error."""
    if not args.invert_args:
        raise Fail("give the `tix invert` arguments after --, as for `run`: plan --accelerator v5litepod-8 -- "
                   "--model M --images DIR --token '<my-cat>'")
    return [[sys.executable, "-m", "tix.cli", "invert", *args.invert_args, "--compile-only",
             f"--target={args.accelerator}"]]


# ---- fetch and delete


def fetch(args: argparse.Namespace) -> list[list[str]]:
    mkdir = ["mkdir", "-p", args.dest]
    if args.src.startswith("gs://"):
        if args.gsutil:
            return [mkdir, ["gsutil", "-m", "rsync", "-r", args.src, args.dest]]
        return [mkdir, ["gcloud", "storage", "rsync", "--recursive", args.src, args.dest]
                + ([f"--project={args.project}"] if args.project else [])]
    # A local --out: only process 0 (worker 0) wrote it.
    return [mkdir, TPU_VM + ["scp", "--recurse", f"{args.name}:{args.src}", args.dest, *_where(args), "--worker=0"]]


def delete(args: argparse.Namespace) -> list[list[str]]:
    if args.queued:
        # --force deletes the queued resource's TPU VMs too.
        return [QUEUED + ["delete", args.name, *_where(args), "--force", "--quiet"]]
    return [TPU_VM + ["delete", args.name, *_where(args), "--quiet"]]


# ---- command line


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", default=os.environ.get("TIX_TPU_NAME"), help="TPU VM / pod slice name")
    common.add_argument("--zone", default=os.environ.get("TIX_TPU_ZONE"), help="e.g. us-west4-a, us-central2-b")
    common.add_argument("--project", default=os.environ.get("TIX_TPU_PROJECT"), help="default: gcloud's project")
    common.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    venv = argparse.ArgumentParser(add_help=False)
    venv.add_argument("--venv", default="tix-venv", help="virtual environment on each worker, relative to its home")

    p = argparse.ArgumentParser(prog="tpu.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)

    # How to create the TPU and install tix: for `create` and `install`, and for `run --retry`, which does both again
    # after a preemption.
    creating = argparse.ArgumentParser(add_help=False)
    creating.add_argument("--accelerator", default="v5litepod-8", help="e.g. v5litepod-8, v5litepod-16, v4-32, v6e-8")
    creating.add_argument("--version", help="TPU software version; default from the accelerator, e.g. "
                                            "v2-alpha-tpuv5-lite")
    creating.add_argument("--spot", action="store_true", help="Spot capacity: cheaper, may be preempted")
    creating.add_argument("--queued", action="store_true",
                          help="request through a queued resource (waits for capacity)")
    creating.add_argument("--labels", help="KEY=VALUE,... labels for the TPU")
    installing = argparse.ArgumentParser(add_help=False)
    source = installing.add_mutually_exclusive_group()
    source.add_argument("--wheel", help="a wheel or sdist file to copy and install (default: build this checkout)")
    source.add_argument("--git", help="install from a git URL[@REF], e.g. https://github.com/you/tix@main")
    source.add_argument("--pip", help="a pip requirement, e.g. 'tix[tpu]==0.1.0'")
    installing.add_argument("--extras", default="tpu",
                            help="tix extras, comma-separated (default: tpu; add tfds for --tfds)")

    c = sub.add_parser("create", parents=[common, creating], help="create a TPU VM or pod slice")
    c.add_argument("--wait", action="store_true", help="with --queued: poll until the TPU VMs are ACTIVE")
    c.set_defaults(fn=create)

    i = sub.add_parser("install", parents=[common, venv, installing], help="install tix on every worker")
    i.set_defaults(fn=install)

    r = sub.add_parser("run", parents=[common, venv, creating, installing],
                       help="run `tix invert ARGS` on all workers (ARGS after --)",
                       usage="tpu.py run --name NAME --zone ZONE [--detach] [--env K=V] [--retry N [create and "
                             "install options]] -- TIX_INVERT_ARGS...")
    r.add_argument("--detach", action="store_true", help=f"run in the background (nohup), output in ~/{LOG}")
    r.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment for the run")
    r.add_argument("--retry", type=int, default=0, metavar="N",
                   help="when the TPU is preempted: wait for capacity, recreate it (with the create options given "
                        "here), reinstall tix (install options) and resume from the checkpoints in the gs:// --out; "
                        "up to N times")
    r.add_argument("--retry-wait", type=float, default=60.0, metavar="S",
                   help="seconds between attempts to create the TPU while there is no capacity (default 60)")
    r.set_defaults(fn=run)

    pl = sub.add_parser("plan", parents=[common], help="compile `tix invert ARGS` for a slice here: does it fit?",
                        usage="tpu.py plan [--accelerator TYPE] -- TIX_INVERT_ARGS...")
    pl.add_argument("--accelerator", default="v5litepod-8", help="the slice to plan for, as for create")
    pl.set_defaults(fn=plan)

    f = sub.add_parser("fetch", parents=[common], help="copy a run's outputs here")
    f.add_argument("--src", required=True, help="gs://bucket/run, or a path on worker 0")
    f.add_argument("--dest", required=True, help="local folder")
    f.add_argument("--gsutil", action="store_true", help="use gsutil -m rsync -r instead of gcloud storage rsync")
    f.set_defaults(fn=fetch)

    d = sub.add_parser("delete", parents=[common], help="delete the TPU VM (or the queued resource and its VMs)")
    d.add_argument("--queued", action="store_true", help="it was created with --queued")
    d.set_defaults(fn=delete)
    return p


def _status(command: list[str]) -> int:
    print(f"+ {shlex.join(command)}", file=sys.stderr, flush=True)
    try:
        return subprocess.run(command).returncode
    except FileNotFoundError:
        raise Fail(f"{command[0]} not found: install the Google Cloud CLI (https://cloud.google.com/sdk), "
                   f"or add --dry-run to print the commands") from None


def execute(commands: list[list[str]]) -> None:
    for command in commands:
        print(f"+ {shlex.join(command)}", file=sys.stderr, flush=True)
        try:
            subprocess.run(command, check=True)
        except FileNotFoundError:
            raise Fail(f"{command[0]} not found: install the Google Cloud CLI (https://cloud.google.com/sdk), "
                       f"or add --dry-run to print the commands") from None
        except subprocess.CalledProcessError as err:
            raise Fail(f"`{shlex.join(command)[:200]}` exited with status {err.returncode}") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything after the first "--" belongs to `tix invert`, untouched by this parser.
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser().parse_args(argv[:cut])
    args.invert_args = argv[cut + 1:]
    if args.action in ("run", "plan") and "--dry-run" in args.invert_args:
        # `tix invert` has no --dry-run: a trailing one is meant for this script, and must not launch a real run.
        args.invert_args = [a for a in args.invert_args if a != "--dry-run"]
        args.dry_run = True
    if args.invert_args and args.action not in ("run", "plan"):
        print(f"tpu.py: error: arguments after -- are only for `run` and `plan`, not `{args.action}`",
              file=sys.stderr)
        return 2
    try:
        commands = args.fn(args)
        if args.action == "run" and args.retry:
            if args.dry_run:
                print("\n".join(retry_plan(args)))
            else:
                run_with_retry(args)
            return 0
        if args.dry_run:
            for command in commands:
                print(shlex.join(command))
            if args.action == "create" and args.queued and args.wait:
                print(f"{shlex.join(wait_command(args))}  # repeated until ACTIVE")
            return 0
        if args.action == "plan":  # tix's own status: 3 when the step does not fit the slice
            return _status(commands[0])
        execute(commands)
        if args.action == "create" and args.queued and args.wait:
            wait_active(args)
    except Fail as err:
        print(f"tpu.py: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
