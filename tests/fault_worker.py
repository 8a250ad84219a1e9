"""`tix` with a fault injected at a chosen point (run by tests/test_faults.py): argv[1] is the fault, the rest the
tix command line. The faults are real signals sent by the process to itself:

  sigterm@K      SIGTERM after step K (the run should save and exit 75)
  sigkill@K      SIGKILL after step K (nothing is saved beyond the last checkpoint)
  sigkill-save@K SIGKILL inside the save of step K, after its files are written and before orbax commits them
  sigkill-export SIGKILL as the embedding file is about to be written (the token library is already saved)
  none           no fault"""

import os
import signal
import sys


def _after_step(k: int, signum: int) -> None:
    from train import report

    log = report.MetricsLog.log

    def log_then_signal(self, step, values):
        log(self, step, values)
        if step == k:
            os.kill(os.getpid(), signum)

    report.MetricsLog.log = log_then_signal


def _inside_save(k: int) -> None:
    from orbax.checkpoint._src.path import atomicity

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize_or_die(self, *args, **kwargs):
        if self._final_path.name == str(k) and self._final_path.parent.name.startswith("wave-"):
            os.kill(os.getpid(), signal.SIGKILL)
        return await finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die


def _inside_export() -> None:
    from tix import embedding_files

    embedding_files.write = lambda *a, **kw: os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    fault, argv = sys.argv[1], sys.argv[2:]
    kind, _, at = fault.partition("@")
    if kind == "sigterm":
        _after_step(int(at), signal.SIGTERM)
    elif kind == "sigkill":
        _after_step(int(at), signal.SIGKILL)
    elif kind == "sigkill-save":
        _inside_save(int(at))
    elif kind == "sigkill-export":
        _inside_export()
    from tix.cli import main as tix_main

    tix_main(argv)


if __name__ == "__main__":
    main()
