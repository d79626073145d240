"""What the report of a real study's size costs: seconds and peak memory of `python -m analysis.report`.

    .venv/bin/python benchmarks/report_scale.py [--subjects 100] [--slices 20] [--work DIR]

Writes a synthetic study folder of the example grid's shape (tests/analysis/synthetic_study.py:
5 backbones x 3 optimizers x 3 losses x 4 prompts = 180 fine-tuned configurations plus 20
zero-shot ones, each scored on subjects x slices test slices: 2,000 by default, 400,000 per-image
rows), then runs `python -m analysis.report STUDY --out DIR` in a child process, as a user
would, and measures it: `report_s` is its wall time (interpreter start, imports, reading the
tables, statistics, figures, writing), `peak_rss_mib` its peak resident memory
(getrusage(RUSAGE_CHILDREN).ru_maxrss: the child is the only one). Also reported: the time to
write the study (`write_s`), the number of figures, the tallest figure in pixels, the size of
report.html, and `max_load_average`, the 1-minute load average at the end (much above 2 on a
2-core machine: other processes competed for the cores). Progress on stderr; the last stdout
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

from PIL import Image  # noqa: E402

from tests.analysis.synthetic_study import configurations, write_synthetic_study  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure(work: Path, subjects: int, slices: int) -> dict:
    study = work / "report-scale"
    log(f"writing a synthetic study of {len(configurations())} configurations x {subjects * slices} test slices")
    started = time.perf_counter()
    write_synthetic_study(study, subjects=subjects, slices=slices)
    write_s = time.perf_counter() - started
    out = work / "report"
    log("running python -m analysis.report")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "analysis.report", str(study), "--out", str(out)], cwd=REPOSITORY,
                   check=True, stdout=subprocess.DEVNULL)
    report_s = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    heights = []
    for path in (out / "figures").glob("*.png"):
        with Image.open(path) as image:
            heights.append(image.height)
    return {"configurations": len(configurations()), "test_images": subjects * slices,
            "per_image_rows": len(configurations()) * subjects * slices, "write_s": round(write_s, 1),
            "report_s": round(report_s, 1), "peak_rss_mib": round(peak_kib / 1024), "figures": len(heights),
            "tallest_figure_px": max(heights), "html_mib": round((out / "report.html").stat().st_size / 2 ** 20, 1),
            "max_load_average": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=100, help="test subjects (default 100)")
    parser.add_argument("--slices", type=int, default=20, help="test slices per subject (default 20)")
    parser.add_argument("--work", type=Path, help="where to write the study and its report (default: a temp folder)")
    args = parser.parse_args(argv)
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        result = measure(args.work, args.subjects, args.slices)
    else:
        with tempfile.TemporaryDirectory(prefix="report-scale-") as folder:
            result = measure(Path(folder), args.subjects, args.slices)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
