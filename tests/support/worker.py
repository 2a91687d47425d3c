"""The entry point of one worker of ``support.processes``: call the target, print its result."""

from __future__ import annotations

import base64
import importlib
import os
import pickle
import sys
import traceback

MARK = "@@RESULT@@ "


def main() -> None:
    target, payload = sys.argv[1], sys.argv[2]
    kwargs = pickle.loads(base64.b64decode(payload))
    module_name, function_name = target.split(":")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        function = getattr(importlib.import_module(module_name), function_name)
        result = (True, function(rank, world_size, **kwargs))
        code = 0
    except BaseException as exc:  # reported to the test, whatever it is
        traceback.print_exc()
        try:
            pickle.dumps(exc)
            result = (False, exc)
        except Exception:
            result = (False, RuntimeError(repr(exc)))
        code = 1
    sys.stdout.flush()
    print(MARK + base64.b64encode(pickle.dumps(result)).decode(), flush=True)
    sys.stdout.flush()
    os._exit(code)  # no interpreter teardown: a process group or jax client may hang in it


if __name__ == "__main__":
    main()
