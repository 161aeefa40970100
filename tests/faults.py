"""Run the kvconvert CLI in a child process with one fault injected (for tests/test_no_data_loss.py).

    python -m tests.faults FAULT ARG -- kvconvert arguments...

FAULT: `kill-at-tensor N` (SIGKILL when the Nth tensor is about to be written), `kill-between-renames`
(SIGKILL after the old output was moved aside, before the new one is moved in), `kill-after-weights` (SIGKILL while
writing config.json), `enospc-at-tensor N` (the Nth tensor write fails with ENOSPC: a full disk), `bad-verify` (the
streamed verify reports a mismatch).
"""

from __future__ import annotations

import errno
import os
import signal
import sys


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def inject(fault: str, arg: str) -> None:
    from kvconvert.io import shards, staging

    if fault in ("kill-at-tensor", "enospc-at-tensor"):
        original, seen = shards.SafetensorsWriter.add, [0]

        def add(self, name, t):
            seen[0] += 1
            if seen[0] == int(arg):
                if fault == "kill-at-tensor":
                    _kill()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
            return original(self, name, t)

        shards.SafetensorsWriter.add = add
    elif fault == "kill-between-renames":
        original_replace = os.replace

        def replace(src, dst, *a, **k):
            if str(src).endswith(".kvconvert-tmp") and not os.path.exists(dst):
                old = os.path.join(os.path.dirname(str(dst)), f".{os.path.basename(str(dst))}.kvconvert-old")
                if os.path.exists(old):
                    _kill()
            return original_replace(src, dst, *a, **k)

        staging.os.replace = replace
    elif fault == "kill-after-weights":
        from kvconvert import export

        original_json = export.json.dumps

        def dumps(obj, *a, **k):
            if isinstance(obj, dict) and "num_key_value_heads" in obj and "architectures" in obj:
                _kill()
            return original_json(obj, *a, **k)

        export.json.dumps = dumps
    elif fault == "bad-verify":
        from kvconvert import pipeline
        from kvconvert.verify import VerifyResult

        pipeline.verify_streamed = lambda *a, **k: VerifyResult(1.0, 1.0, 16)
    else:
        raise SystemExit(f"unknown fault {fault}")


if __name__ == "__main__":
    fault, arg, sep, *rest = sys.argv[1:]
    assert sep == "--"
    inject(fault, arg)
    from kvconvert.cli import main

    sys.argv = ["kvconvert", *rest]
    main()
