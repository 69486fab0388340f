"""Run the parity builds of tests/precompute/test_vllm.py with one vLLM engine (a subprocess of the test).

python -m tests.precompute.vllm_builds TEACHER CORPUS OUT
"""

import json
import os
import sys
from pathlib import Path

from tests.precompute.parity import BUILDS, build_config, forced_decoding, smc_estimates


def main() -> None:
    teacher, corpus, out = sys.argv[1:4]
    from ar2mdm.precompute.build import run_build
    from ar2mdm.precompute.vllm_backend import VllmTeacher
    from ar2mdm.shared.hfmodel import resolve_model

    folder, _ = resolve_model(teacher)
    engine = VllmTeacher.load(folder, {"max_model_len": "256"}, 64, 0)
    try:
        for name in BUILDS:
            run_build(build_config(name, teacher, corpus, Path(out) / name, backend="vllm"), teacher=engine)
        (Path(out) / "smc.json").write_text(json.dumps(smc_estimates(engine)))
        (Path(out) / "forced.json").write_text(json.dumps(forced_decoding(engine)))
    finally:
        engine.close()
    print(json.dumps({"ok": True}), flush=True)
    os._exit(0)  # vLLM 0.32 aborts the interpreter's teardown (see precompute/cli.py)


if __name__ == "__main__":
    main()
