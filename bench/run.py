"""Run the benchmarks on this machine and merge their results into bench/results.json.

    python bench/run.py [--only P1] [--model-dir demo-out/models/demo]

Each id maps to {"ratio": x, ...details}; ratios are measured side by side in one run (DESIGN.md s.6).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def main() -> None:
    import classifier_scaling
    import cost_projection
    import p1_guidance_overhead
    import p2_diffusers_ddim
    import p3_faiss
    import p4_s3_input
    import p5_train_throughput
    import p6_sampling_scaleout
    import p7_cuda
    import p8_scale
    import p9_resume_check

    benches = {
        "P1": lambda a: p1_guidance_overhead.run(a.model_dir),
        "P5": lambda a: p5_train_throughput.run(),
        "classifier_scaling": lambda a: classifier_scaling.run(a.results.get("classifier_scaling")),
        "P2": lambda a: p2_diffusers_ddim.run(a.model_dir),
        "P3": lambda a: p3_faiss.run(),
        "P4": lambda a: p4_s3_input.run(),
        "P6": lambda a: p6_sampling_scaleout.run(),
        "P7": lambda a: p7_cuda.run(),
        "P8": lambda a: p8_scale.run(previous=a.results.get("P8")),
        "P9": lambda a: p9_resume_check.run(),
        # after P8 and classifier_scaling (sorted order): reads their entries, this run's included
        "cost_projection": lambda a: cost_projection.run(results=a.results),
    }
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", action="append", choices=sorted(benches))
    p.add_argument(
        "--model-dir", help="models/<run> folder of a demo store (default: random weights)"
    )
    p.add_argument("--out", default=str(HERE / "results.json"))
    args = p.parse_args()
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.exists() else {}
    args.results = results  # the benches that build on others' entries read them here
    for bench_id in args.only or sorted(benches):
        print(f"==> {bench_id}", flush=True)
        res = benches[bench_id](args)
        res["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        res["machine"] = (
            f"{platform.machine()}, {__import__('os').cpu_count()} CPUs, {platform.python_version()}"
        )
        results[bench_id] = res
        print(json.dumps({bench_id: res}, indent=2), flush=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
