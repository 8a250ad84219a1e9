"""One process of a simulated multi-host run (run by tests/test_multihost.py): N local CPU devices, gloo collectives.

Prints one JSON line: the image files this process decoded, the learned vectors, and the files it opened for writing
from Python under the run folder. An optional last argument, JSON, may ask for `resume` and for `sigterm_at`: this
process then sends itself SIGTERM after that step, and prints STOPPED and exits as `tix` does when it stops."""

import builtins
import io
import json
import os
import sys

from tests.xla_flags import with_devices


def main() -> None:
    out, concepts, model, devices, pid, nproc, port = sys.argv[1:8]
    options = json.loads(sys.argv[8]) if len(sys.argv) > 8 else {}
    os.environ["XLA_FLAGS"] = with_devices(int(devices))
    os.environ["JAX_PLATFORMS"] = "cpu"
    writes: list[str] = []
    real_open = builtins.open

    def watching_open(file, mode="r", *args, **kwargs):
        if any(m in mode for m in "wax+") and str(file).startswith(out):
            writes.append(str(file))
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = watching_open  # pathlib writes through io.open
    from train.config import TrainConfig
    from train.invert import run
    from train.stop import Stopped

    if "sigterm_at" in options:
        import signal

        from train.report import MetricsLog

        log = MetricsLog.log

        def log_then_signal(self, step, values):
            log(self, step, values)
            if step == options["sigterm_at"]:
                os.kill(os.getpid(), signal.SIGTERM)

        MetricsLog.log = log_then_signal

    extra = {}
    if int(nproc) > 1:
        extra = dict(coordinator_address=f"127.0.0.1:{port}", num_processes=int(nproc), process_id=int(pid))
    cfg = TrainConfig(model=model, concepts=concepts, out=out, init="cat", steps=4, batch_size=2, validate_every=0,
                      save_every=2, log_every=1, seed=11, resume=options.get("resume", False), **extra)
    try:
        result = run(cfg, progress=False)
    except Stopped as stop:
        print(f"STOPPED {stop}", flush=True)
        sys.exit(stop.exit_code)
    print("RESULT " + json.dumps({
        "images": sorted(str(p) for p in result.images_read),
        "vectors": {t: v["text_encoder"].tolist() for t, v in result.vectors.items()},
        "writes": writes,
    }))


if __name__ == "__main__":
    main()
